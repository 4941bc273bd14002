r"""CSL on Cityscapes (docs/methods/csl.md §10-11): UniMatch V1 + CSL soft weights.

    python main.py --config=configs/csl_cityscapes.py:1_16 --workdir=runs/csl_city_1_16 \
        --config.data.root=/data/csl

`:SPLIT[,VARIANT]`. Splits: 1_30, 1_16, 1_8, 1_4, 1_2 (UniMatch lists). Variants as in
configs/csl_pascal.py: `csl` (default: EMA teacher 0.99, alpha 8, unscaled, TMP p 0.5 / cover 0.7 /
block 32), `csl_online` (online teacher), `csl_released` (the released code's options; it ships no
Cityscapes recipe, so batch and schedule stay these). DeepLabV3+ deep-stem R101 from ImageNet
(model.init_from='imagenet'; random init only with --config.model.init_from=none), OS8, ASPP
12/24/36, bf16 convolutions; crop 801; global batch 8 labeled / 8 unlabeled / 8 mix, loss group 2
(UniMatch's per-GPU batch); SGD lr 5e-3 (x1), poly, 240 epochs over the unlabeled set; OHEM (0.7,
200000 per 2 images); FP; sliding-window evaluation (801, stride 534, softmax sum) of the teacher
and the student (EMA teacher; the teacher picks the best checkpoint). tau is 0 as in UniMatch's
Cityscapes recipe (used only with --config.method.selector=threshold). Targets: the CSL paper's
tables. Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1_16"):
    split, variant = common.split_and_variant(arg, "1_16")
    return common.get_recipe("cityscapes", split, "csl", variant)
