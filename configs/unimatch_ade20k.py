r"""UniMatch V1 on ADE20K, 150 classes: our recipe (docs/data.md "ADE20K"), not a published one.

    python -m data_prep ade20k --raw /data/ADEChallengeData2016 --out /data/csl
    python main.py --config=configs/unimatch_ade20k.py:1_64 --workdir=runs/unimatch_ade_1_64 \
        --config.data.root=/data/csl

Splits (`:arg`): 1_64, 1_32, 1_16, 1_8, 1_4, 1_2 (UniMatch V2's nested lists: 316 ... 10,105
labeled images of 20,210). UniMatch V1 ships no ADE20K recipe; this one is ours: UniMatch V1's
COCO recipe (crop 513, global batch 8 labeled / 8 unlabeled / 8 mix, loss group 2, SGD lr 0.004
with the head x10, poly, CE, tau 0.95, two CutMix strong views and FP) on the deep-stem R101 OS16
from ImageNet, 60 epochs over the unlabeled set (UniMatch V2's ADE20K epochs), whole-image
evaluation at the original size. Orientation only: UniMatch V2's README lists UniMatch V1 with
ResNet-101 at 21.6 / 28.1 / 31.5 / 34.6 for 1/64 ... 1/8, recipe unpublished. Not yet measured
with csl_jax.
"""

from configs import common


def get_config(arg: str = "1_64"):
    return common.get_recipe("ade20k", arg, "unimatch")
