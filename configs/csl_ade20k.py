r"""CSL on ADE20K: our recipe (configs/unimatch_ade20k.py) with the CSL options of a variant.

    python main.py --config=configs/csl_ade20k.py:1_64 --workdir=runs/csl_ade_1_64 \
        --config.data.root=/data/csl

`:SPLIT[,VARIANT]`. Splits: 1_64, 1_32, 1_16, 1_8, 1_4, 1_2. Variants as in configs/csl_pascal.py.
Deep-stem R101 OS16 from ImageNet, ASPP 6/12/18 (CSL's OS8 network is kept for the datasets of its
paper), bf16 convolutions, crop 513, global batch 8 / 8 / 8, loss group 2, SGD lr 0.004 (head
x10), poly (step t at poly(t)), 60 epochs, whole-image evaluation at the original size of the
teacher and the student. The residual variance uses C = 150 (float32 numerics: docs/methods/csl.md
§12). No published reference. Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1_64"):
    split, variant = common.split_and_variant(arg, "1_64")
    return common.get_recipe("ade20k", split, "csl", variant)
