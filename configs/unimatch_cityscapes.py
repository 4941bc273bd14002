r"""UniMatch V1 on Cityscapes (docs/methods/unimatch.md, current official recipe: OS16, tau 0).

    python main.py --config=configs/unimatch_cityscapes.py:1_16 --workdir=runs/unimatch_city_1_16 \
        --config.data.root=/data/csl

Splits (`:arg`): 1_30, 1_16, 1_8, 1_4, 1_2 (UniMatch lists). DeepLabV3+ deep-stem R101, OS16,
ASPP 6/12/18; crop 801; global batch 8 labeled / 8 unlabeled / 8 mix; SGD lr 5e-3 (x1), poly, 240
epochs over the unlabeled set; OHEM (0.7, 200000 per 2 images); threshold tau 0 (every
pseudo-label used); two CutMix strong views and FP; online pseudo-labels, eval-mode mix pass, both
train passes update BN statistics; sliding-window evaluation (801, stride 534, softmax sum).
FixMatch: --config.method.name=fixmatch --config.method.second_view=none
--config.method.use_fp=False. Reference (UniMatch README, R101): 76.6 / 77.9 / 79.2 / 79.5 for
1/16 ... 1/2. Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1_16"):
    return common.get_recipe("cityscapes", arg, "unimatch")
