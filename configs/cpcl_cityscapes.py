r"""CPCL on Cityscapes (docs/methods/cpcl.md): the official exp_city recipe.

    python main.py --config=configs/cpcl_cityscapes.py:1_8 --workdir=runs/cpcl_city_1_8 \
        --config.data.root=/data/csl

Splits (`:SPLIT[,VARIANT]`): 1_16, 1_8, 1_4, 1_2 (UniMatch's lists; CPS's are not available).
Variants: 'head' (default; report row 'cpcl') is leofansq/CPCL at HEAD f0e1800 (exp_city/config.py
and train.py as of c1a3cef); 'first_commit' (row 'cpcl_first_commit') is its first commit 0bf0c50:
confidence 'first_commit' and batch 3 (min_kept 50000 x 3, its total steps at the README epochs).
Recipe (HEAD): the Pascal network (configs/cpcl_pascal.py, backbones from resnet50_v1c.pth) with
19 classes; crop 800; global batch 16 labeled + 16 u0 + 16 u1, every loss over the whole batch
(loss group 16); SGD lr 0.01; the reference's total steps (its epochs x `(2975 - 2975 // ratio)
// 16`); labeled loss: class-weighted OHEM (thresh 0.7, min_kept 50000 x 16 = 800000 over the
batch, torch's weighted mean); lambda_u 5; per-pixel confidence weights ('pixel') and unlabeled
losses averaged over all pixels (CE with reduction='none': 'pixel_mean'); branch 1 evaluated with
CPCL's sliding window (800, stride 534, 2 x 4 windows on 1024 x 2048, logits summed).

Targets (README image, mIoU %, R50, branch 1, CPS lists, best saved epoch; in the repository since
0bf0c50, whose config.py has batch 3, while HEAD's README gives these epochs "for batch_size=16"):

| | 1/16 | 1/8 | 1/4 | 1/2 |
|---|---|---|---|---|
| CPCL | 69.92 | 74.60 | 76.98 | 78.17 |
| supervised only | 61.67 | 68.63 | 73.22 | 75.36 |

Not yet measured with csl_jax.
"""

from configs.cpcl_pascal import VARIANTS, cpcl_recipe
from csl_jax.methods.cpcl import losses as cpcl_losses

#: the README's epochs per labeled ratio (spec §5).
CITYSCAPES_EPOCHS = {"1_16": 128, "1_8": 137, "1_4": 160, "1_2": 240}
#: the global batch (labeled = u0 = u1) of exp_city/config.py: 16 at HEAD, 3 at 0bf0c50.
BATCH = {VARIANTS["head"]: 16, VARIANTS["first_commit"]: 3}


def reference_steps(split: str, batch: int) -> int:
    """nepochs x niters_per_epoch of exp_city/config.py: niters = max(L, U) // batch, L = 2975 // ratio."""
    labeled = 2975 // int(split.split("_")[1])
    return CITYSCAPES_EPOCHS[split] * (max(labeled, 2975 - labeled) // batch)


def get_config(arg: str = "1_8"):
    c = cpcl_recipe("cityscapes", arg, CITYSCAPES_EPOCHS)
    batch = BATCH[c.method.variant]
    c.optim.total_steps = reference_steps(c.data.split, batch)
    c.data.crop_size = 800
    c.batch.labeled = c.batch.unlabeled = batch
    c.loss.update(labeled="ohem_weighted", group_size=batch, ohem_thresh=0.7, ohem_min_kept=50000 * batch)
    c.method.update(unsup_weight=5.0, class_weights=cpcl_losses.CITYSCAPES_CLASS_WEIGHTS)
    c.optim.lr = 0.01
    return c
