r"""U2PL on Cityscapes (docs/methods/u2pl.md; official experiments/cityscapes/744/ours/config.yaml).

    python main.py --config=configs/u2pl_cityscapes.py:744 --workdir=runs/u2pl_city_744 \
        --config.data.root=/data/csl

`:SPLIT[,VARIANT]`. Splits (U2PL's lists, data.family='cityscapes_u2pl'): 186, 372, 744, 1488.
Variants as configs/u2pl_pascal.py: `reference` (default, the official code; the targets below are
its) and `intended` (e.g. `:744,intended`). Recipe: the U2PL DeepLabV3+ (configs/u2pl_pascal.py,
U2PL's own ImageNet R101) with the auxiliary head on layer3 (weight 0.4); crop 769;
global batch 16 + 16 in loss groups of 2 (8 GPUs x 2); SGD lr 1e-2 (x1 everywhere), weight decay
5e-4, poly 0.9, 200 epochs; OHEM (0.7, 100000 kept per group of 2) on both heads; no
supervised-only epoch (E0 = 0: the teacher starts as the student's copy); L_c weight 0.125 (1/W,
W = 8); the rest as Pascal. Evaluations: 'model' and 'student' with the house sliding window
(801/534 softmax; here window = crop 769) and 'model:sliding_u2pl' (U2PL's eval.py: 769 windows,
stride 513, shifted inside, logits averaged).

Targets of the `reference` variant (mIoU %, R101, teacher, eval.py sliding 769/513; docs/methods/u2pl.md):

| setting | splits | SupOnly | U2PL w/ CutMix |
|---|---|---|---|
| Cityscapes U2PL lists | 186 / 372 / 744 / 1488 | 65.74 / 72.53 / 74.43 / 77.83 | 70.30 / 74.37 / 76.47 / 79.05 |

Not yet measured with csl_jax.
"""

from configs.u2pl_pascal import u2pl_recipe


def get_config(arg: str = "744"):
    c = u2pl_recipe("cityscapes", arg, "744")
    c.data.family = "cityscapes_u2pl"
    return c
