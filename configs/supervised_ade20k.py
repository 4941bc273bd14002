r"""Supervised baseline on ADE20K, labeled images only: our recipe (see configs/unimatch_ade20k.py).

    python main.py --config=configs/supervised_ade20k.py:1_64 --workdir=runs/sup_ade_1_64 \
        --config.data.root=/data/csl

Splits (`:arg`): 1_64, 1_32, 1_16, 1_8, 1_4, 1_2. Deep-stem R101 OS16 from ImageNet, crop 513,
global batch 16, SGD lr 0.004 (head x10), 60 epochs over the labeled list, whole-image evaluation
at the original size. No published ResNet-era reference. Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1_64"):
    return common.get_recipe("ade20k", arg, "supervised")
