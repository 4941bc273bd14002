r"""UniMatch V1 on Pascal VOC 2012 (docs/methods/unimatch.md); FixMatch with the overrides below.

    python main.py --config=configs/unimatch_pascal.py:1464 --workdir=runs/unimatch_pascal_1464 \
        --config.data.root=/data/csl

Splits (`:arg`): classic 92, 183, 366, 732, 1464; blended 1_16, 1_8, 1_4; u2pl_1_16, u2pl_1_8,
u2pl_1_4 (UniMatch uses crop 513 there: --config.data.crop_size=513). DeepLabV3+ deep-stem R101,
OS16, ASPP 6/12/18; crop 321; global batch 8 labeled / 8 unlabeled / 8 mix; SGD lr 1e-3 (head
x10), poly, 80 epochs over the unlabeled set; CE; threshold tau 0.95; two CutMix strong views and
FP; online pseudo-labels, eval-mode mix pass, both train passes update BN statistics; whole-image
evaluation. FixMatch: --config.method.name=fixmatch --config.method.second_view=none
--config.method.use_fp=False. Reference (UniMatch README, R101, classic): 75.2 / 77.2 / 78.8 /
79.9 / 81.2 for 92 ... 1464. Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1464"):
    return common.get_recipe("pascal", arg, "unimatch")
