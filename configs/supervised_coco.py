r"""Supervised baseline on COCO 2017 (UniMatch `supervised.py` recipe), labeled images only.

    python main.py --config=configs/supervised_coco.py:1_512 --workdir=runs/sup_coco_1_512 \
        --config.data.root=/data/csl

Splits (`:arg`): 1_512, 1_256, 1_128, 1_64, 1_32. DeepLabV3+ on Xception-65 from ImageNet, OS16,
crop 513, global batch 16 (UniMatch doubles the semi-supervised batch of 8), SGD lr 0.004 (head
x10), 30 epochs over the labeled list (1/512: 14 steps per epoch), whole-image evaluation at the
original size. Reference (UniMatch README, no log shipped): 22.9 / 28.0 / 33.6 / 37.8 / 42.2 for
1/512 ... 1/32. Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1_512"):
    return common.get_recipe("coco", arg, "supervised")
