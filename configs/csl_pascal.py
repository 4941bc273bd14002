r"""CSL on Pascal VOC 2012 (docs/methods/csl.md §11): UniMatch V1 + CSL soft weights, TMP, EMA teacher.

    python main.py --config=configs/csl_pascal.py:1464 --workdir=runs/csl_pascal_1464 \
        --config.data.root=/data/tfds

Splits (`:arg`): classic 92, 183, 366, 732, 1464; blended 1_16, 1_8, 1_4; u2pl_1_16, u2pl_1_8,
u2pl_1_4 (use --config.data.crop_size=513 for the U2PL lists). DeepLabV3+ deep-stem R101, OS8,
ASPP 12/24/36, bf16 convolutions; crop 321; global batch 8 labeled / 8 unlabeled / 8 mix; SGD lr
1e-3 (head x10), poly, 80 epochs over the unlabeled set; CE; alpha 8; TMP p 0.5, cover 0.7, block
32; FP; EMA teacher 0.99 (the official code's online teacher: --config.method.teacher=online);
whole-image evaluation of the teacher and the student (--config.eval.evaluations, default both),
the teacher picks the best checkpoint (--config.eval.best). Targets: the CSL paper's tables. Not yet
measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1464"):
    return common.get_recipe("pascal", arg, "csl")
