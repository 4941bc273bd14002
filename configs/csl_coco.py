r"""CSL on COCO 2017 (docs/methods/csl.md §10-11): UniMatch V1's COCO recipe + CSL soft weights.

    python main.py --config=configs/csl_coco.py:1_512 --workdir=runs/csl_coco_1_512 \
        --config.data.root=/data/csl

`:SPLIT[,VARIANT]`. Splits: 1_512, 1_256, 1_128, 1_64, 1_32. Variants as in configs/csl_pascal.py
(`csl`, `csl_online`, `csl_released`). The CSL paper reports COCO, but neither its COCO recipe nor
its COCO table is in the released code (ljs11528/pseudo-label-selection at b838917 has Pascal and
Cityscapes configs only), so this is UniMatch's COCO network and schedule (configs/unimatch_coco.py:
Xception-65 from ImageNet at OS16, ASPP 6/12/18, crop 513, global batch 8 / 8 / 8, loss group 2,
SGD lr 0.004 (head x10), 30 epochs, whole-image evaluation at the original size) with the CSL
options of the variant (EMA teacher 0.99, alpha 8, TMP p 0.5 / cover 0.7 / block 32 px), bf16
convolutions and CSL's poly schedule (step t at poly(t)). The residual variance uses C = 81: its
float32 numerics are checked against float64 in docs/methods/csl.md §12. Target: UniMatch's row
(31.9 / 38.9 / 44.4 / 48.2 / 49.8); CSL's own COCO numbers could not be read here. Not yet measured
with csl_jax.
"""

from configs import common


def get_config(arg: str = "1_512"):
    split, variant = common.split_and_variant(arg, "1_512")
    return common.get_recipe("coco", split, "csl", variant)
