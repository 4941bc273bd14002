r"""Supervised baseline on Pascal VOC 2012 (UniMatch `supervised.py` recipe), labeled images only.

    python main.py --config=configs/supervised_pascal.py:1464 --workdir=runs/sup_pascal_1464 \
        --config.data.root=/data/csl

Splits (`:arg`): classic 92, 183, 366, 732, 1464; blended 1_16, 1_8, 1_4; u2pl_1_16, u2pl_1_8,
u2pl_1_4 (use crop 513 for the U2PL lists). R101 OS16, crop 321, global batch 16 (UniMatch doubles
the semi-supervised batch of 8), lr 1e-3 (head x10), 80 epochs over the labeled list, whole-image
evaluation. Reference (UniMatch README, R101): 45.1 / 55.3 / 64.8 / 69.7 / 73.5 for 92 ... 1464.
Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1464"):
    return common.get_recipe("pascal", arg, "supervised")
