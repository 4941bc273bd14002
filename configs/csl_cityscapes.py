r"""CSL on Cityscapes (docs/methods/csl.md §11): UniMatch V1 + CSL soft weights, TMP, EMA teacher.

    python main.py --config=configs/csl_cityscapes.py:1_16 --workdir=runs/csl_city_1_16 \
        --config.data.root=/data/tfds

Splits (`:arg`): 1_30, 1_16, 1_8, 1_4, 1_2 (UniMatch lists). DeepLabV3+ deep-stem R101, OS8, ASPP
12/24/36, bf16 convolutions; crop 801; global batch 8 labeled / 8 unlabeled / 8 mix; SGD lr 5e-3
(x1), poly, 240 epochs over the unlabeled set; OHEM (0.7, 200000 per 2 images); alpha 8; TMP p
0.5, cover 0.7, block 32; FP; EMA teacher 0.99 (official: --config.method.teacher=online);
sliding-window evaluation (801, stride 534, softmax sum) of the teacher and the student
(--config.eval.evaluations, default both; the teacher picks the best checkpoint, --config.eval.best).
tau is 0 as in UniMatch's Cityscapes recipe (used only with --config.method.selector=threshold).
Targets: the CSL paper's tables. Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1_16"):
    return common.get_recipe("cityscapes", arg, "csl")
