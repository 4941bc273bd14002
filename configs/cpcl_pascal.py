r"""CPCL on Pascal VOC 2012 (docs/methods/cpcl.md): the official exp_voc recipe.

    python main.py --config=configs/cpcl_pascal.py:1_8 --workdir=runs/cpcl_pascal_1_8 \
        --config.data.root=/data/tfds

Splits (`:arg`): blended 1_16, 1_8, 1_4 (UniMatch's lists: CPS's are not available, and csl_jax
has no blended 1/2 list; see the spec §5) and the classic PseudoSeg-size subsets 92, 183, 366, 732
(the README's few-supervision rows; the full-supervision 1464 row has no published schedule).
Recipe (exp_voc/config.py, train.py): two CPS DeepLabV3+ branches (deep-stem R50, both
backbones from the same ImageNet file, model.init_from='imagenet'; layer4 dilated 2/4/8, ASPP
6/12/18 with LeakyReLU and the added pooling branch); CPCL geometry (hflip, scale from {0.5, 0.75,
1, 1.5, 1.75, 2}, cv2-style resize, crop 512 with centred mean-colour padding); global batch 8
labeled + 8 u0 + 8 u1, every loss over the whole batch (loss group 8); SGD lr 0.005 on every
parameter, momentum 0.9, weight decay 1e-4 on conv kernels only, poly 0.9; the reference's total
steps (its epochs x `(10582 - 10582 // ratio) // 8`); CE; lambda_u 1; the official unlabeled
losses (`criterion` with reduction='mean': 'valid_mean') and confidence weights ('reference');
evaluation of branch 1 (and branch 2) with CPCL's sliding window (512, stride 342, logits summed).

Targets (README images, mIoU %, branch 1, CPS blended lists, best saved epoch):

| | 1/16 | 1/8 | 1/4 | 1/2 |
|---|---|---|---|---|
| CPCL R50 | 71.66 | 73.74 | 74.58 | 75.30 |
| CPCL R101 (`--config.model.depth=101`) | 73.44 | 76.40 | 77.16 | 77.67 |
| supervised only, R50 | 62.00 | 67.16 | 71.66 | 74.05 |

Few-supervision (PseudoSeg subsets 92 / 183 / 366 / 732, R50): 61.88 / 67.02 / 72.14 / 74.25.
csl_jax's lists differ from CPS's (treat differences below ~1 mIoU as split and seed noise).
Not yet measured with csl_jax.
"""

from configs import common
from csl_jax.methods import cpcl

#: total steps of the reference per labeled ratio: nepochs x niters_per_epoch (spec §5).
PASCAL_STEPS = {"1_16": 39680, "1_8": 39338, "1_4": 39680, "92": 39680, "183": 39338, "366": 39680,
                "732": 39660}


def cpcl_recipe(dataset: str, split: str, steps: dict):
    """The base config of a CPCL recipe on `dataset` with the reference's total steps for `split`."""
    if split not in steps:
        raise ValueError(f"cpcl_{dataset}: split {split!r} has no CPCL schedule; valid: {', '.join(steps)}")
    c = common.get_base_config()
    cpcl.configure(c)
    c.data.name = dataset
    c.data.split = split
    c.optim.total_steps = steps[split]
    c.loss.labeled = "ce"
    c.eval.protocol = "sliding_cpcl"
    return c


def get_config(arg: str = "1_8"):
    c = cpcl_recipe("pascal", arg, PASCAL_STEPS)
    c.data.crop_size = 512
    c.model.init_from = "imagenet"
    c.batch.labeled = c.batch.unlabeled = 8
    c.loss.group_size = 8
    c.optim.lr = 0.005
    return c
