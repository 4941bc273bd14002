r"""UniMatch V1 on COCO 2017, 81 classes (docs/methods/unimatch.md, docs/data.md "COCO").

    python -m data_prep coco --raw /data/coco2017 --out /data/csl
    python main.py --config=configs/unimatch_coco.py:1_512 --workdir=runs/unimatch_coco_1_512 \
        --config.data.root=/data/csl

Splits (`:arg`): 1_512, 1_256, 1_128, 1_64, 1_32 (232 / 463 / 925 / 1849 / 3697 labeled images,
UniMatch's lists, not nested; unlabeled = train2017 minus the labeled list). UniMatch's COCO recipe
(LiheYoung/UniMatch `configs/coco.yaml` at 0324f3d): DeepLabV3+ on Xception-65 from ImageNet
(model.init_from='imagenet' = UniMatch's xception.pth, downloaded once), OS16, ASPP 6/12/18; crop
513; global batch 8 labeled / 8 unlabeled / 8 mix, loss group 2; SGD lr 0.004 (head x10), poly, lr
set after each step, 30 epochs over the unlabeled set; CE; threshold tau 0.95; two CutMix strong
views and FP; whole-image evaluation at the original size (81 classes, background counted).
Reference (UniMatch README, Xception-65): 31.9 / 38.9 / 44.4 / 48.2 / 49.8 for 1/512 ... 1/32
(best epoch; the 1/512 and 1/256 logs end at epochs 20 and 27). The reference masks were
pre-processed by the UniMatch authors; masks generated with `--from-instances` are an
approximation (docs/data.md). Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1_512"):
    return common.get_recipe("coco", arg, "unimatch")
