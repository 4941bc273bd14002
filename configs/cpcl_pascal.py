r"""CPCL on Pascal VOC 2012 (docs/methods/cpcl.md): the official exp_voc recipe.

    python main.py --config=configs/cpcl_pascal.py:1_8 --workdir=runs/cpcl_pascal_1_8 \
        --config.data.root=/data/csl

Splits (`:SPLIT[,VARIANT]`): blended 1_16, 1_8, 1_4 (UniMatch's lists: CPS's are not available, and
csl_jax has no blended 1/2 list; see the spec §5) and the classic PseudoSeg-size subsets 92, 183,
366, 732 (the README's few-supervision rows; the full-supervision 1464 row has no published
schedule). Variants: 'head' (default; report row 'cpcl') is leofansq/CPCL at HEAD f0e1800, whose
exp_voc/train.py dates from c1a3cef; 'first_commit' (row 'cpcl_first_commit') is its first commit
0bf0c50 (confidence 'first_commit', unlabeled losses 'valid_mean'), which the author later fixed.
Recipe (exp_voc/config.py, train.py at HEAD): two CPS DeepLabV3+ branches (deep-stem R50, both
backbones from CPCL's ImageNet file resnet50_v1c.pth: model.init_from='imagenet:resnet50_v1c';
layer4 dilated 2/4/8, ASPP 6/12/18 with LeakyReLU and the added pooling branch); CPCL geometry
(hflip, scale from {0.5, 0.75, 1, 1.5, 1.75, 2}, cv2-style resize, crop 512 with centred
mean-colour padding); global batch 8 labeled + 8 u0 + 8 u1, every loss over the whole batch (loss
group 8); SGD lr 0.005 on every parameter, momentum 0.9, weight decay 1e-4 on conv kernels only,
poly 0.9; the reference's total steps (its epochs x `(10582 - 10582 // ratio) // 8`); CE; lambda_u
1; per-pixel confidence weights ('pixel') and both unlabeled losses averaged over all pixels
(`criterion_unsup` with reduction='none': 'pixel_mean'); evaluation of branch 1 (and branch 2)
with CPCL's sliding window (512, stride 342, logits summed).

Targets (README images, mIoU %, branch 1, CPS blended lists, best saved epoch; which commit's code
produced them is not stated: the images are in the first commit 0bf0c50 already):

| | 1/16 | 1/8 | 1/4 | 1/2 |
|---|---|---|---|---|
| CPCL R50 | 71.66 | 73.74 | 74.58 | 75.30 |
| CPCL R101 (see below) | 73.44 | 76.40 | 77.16 | 77.67 |
| supervised only, R50 | 62.00 | 67.16 | 71.66 | 74.05 |

R101: `--config.model.depth=101 --config.model.init_from=imagenet:resnet101_v1c` (the README's
R101 runs need an edited network.py import and resnet101_v1c.pth).
Few-supervision (PseudoSeg subsets 92 / 183 / 366 / 732, R50): 61.88 / 67.02 / 72.14 / 74.25.
csl_jax's lists differ from CPS's (treat differences below ~1 mIoU as split and seed noise).
Not yet measured with csl_jax.
"""

from configs import common
from csl_jax.methods import cpcl

#: total steps of the reference per labeled ratio: nepochs x niters_per_epoch (spec §5).
PASCAL_STEPS = {"1_16": 39680, "1_8": 39338, "1_4": 39680, "92": 39680, "183": 39338, "366": 39680,
                "732": 39660}
#: `:SPLIT,VARIANT` -> the report row (config.method.variant): leofansq/CPCL at HEAD, or its first commit.
VARIANTS = {"head": "cpcl", "first_commit": "cpcl_first_commit"}


def cpcl_recipe(dataset: str, arg: str, splits):
    """The base config of a CPCL recipe on `dataset` for `arg` = 'SPLIT[,VARIANT]' (SPLIT in `splits`,
    default 1_8; VARIANT in VARIANTS, default 'head'). 'first_commit' sets confidence='first_commit';
    the dataset configs add the rest of 0bf0c50. The total steps are the dataset config's."""
    split, _, variant = arg.partition(",")
    split, variant = split or "1_8", variant or "head"
    if split not in splits:
        raise ValueError(f"cpcl_{dataset}: split {split!r} has no CPCL schedule; valid: {', '.join(splits)}")
    if variant not in VARIANTS:
        raise ValueError(f"cpcl_{dataset}: variant {variant!r}; valid: {', '.join(VARIANTS)}")
    c = common.get_base_config()
    cpcl.configure(c)
    c.method.variant = VARIANTS[variant]
    if variant == "first_commit":
        c.method.confidence = "first_commit"
    c.data.name = dataset
    c.data.split = split
    c.model.init_from = "imagenet:resnet50_v1c"
    c.loss.labeled = "ce"
    c.eval.protocol = "sliding_cpcl"
    return c


def get_config(arg: str = "1_8"):
    c = cpcl_recipe("pascal", arg, PASCAL_STEPS)
    c.optim.total_steps = PASCAL_STEPS[c.data.split]
    if c.method.variant == VARIANTS["first_commit"]:
        c.method.unsup_reduction = "valid_mean"  # 0bf0c50's exp_voc: `criterion` (reduction='mean')
    c.data.crop_size = 512
    c.batch.labeled = c.batch.unlabeled = 8
    c.loss.group_size = 8
    c.optim.lr = 0.005
    return c
