r"""Supervised baseline on Cityscapes (UniMatch `supervised.py` recipe), labeled images only.

    python main.py --config=configs/supervised_cityscapes.py:1_16 --workdir=runs/sup_city_1_16 \
        --config.data.root=/data/csl

Splits (`:arg`): 1_30, 1_16, 1_8, 1_4, 1_2 (UniMatch lists); R101 OS16, crop 801, global batch 16,
lr 5e-3 (x1), 240 epochs over the labeled list, OHEM (0.7, 200000 per 2 images), sliding-window
evaluation (801, stride 534, softmax sum). Reference (UniMatch README, R101): 66.3 / 72.8 / 75.0 /
78.0 for 1/16 ... 1/2. Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1_16"):
    return common.get_recipe("cityscapes", arg, "supervised")
