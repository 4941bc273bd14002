r"""CPCL on Cityscapes (docs/methods/cpcl.md): the official exp_city recipe.

    python main.py --config=configs/cpcl_cityscapes.py:1_8 --workdir=runs/cpcl_city_1_8 \
        --config.data.root=/data/tfds

Splits (`:arg`): 1_16, 1_8, 1_4, 1_2 (UniMatch's lists; CPS's are not available). Recipe
(exp_city/config.py, train.py): the Pascal network (configs/cpcl_pascal.py) with 19 classes; crop
800; global batch 16 labeled + 16 u0 + 16 u1, every loss over the whole batch (loss group 16);
SGD lr 0.01; the reference's total steps (its epochs x `(2975 - 2975 // ratio) // 16`); labeled
loss: class-weighted OHEM (thresh 0.7, min_kept 50000 x 16 = 800000 over the batch, torch's
weighted mean); lambda_u 5; unlabeled losses as the Cityscapes code (CE with reduction='none',
mean over all pixels: 'pixel_mean'), confidence 'reference'; branch 1 evaluated with CPCL's
sliding window (800, stride 534, 2 x 4 windows on 1024 x 2048, logits summed).

Targets (README image, mIoU %, R50, branch 1, CPS lists, best saved epoch):

| | 1/16 | 1/8 | 1/4 | 1/2 |
|---|---|---|---|---|
| CPCL | 69.92 | 74.60 | 76.98 | 78.17 |
| supervised only | 61.67 | 68.63 | 73.22 | 75.36 |

Not yet measured with csl_jax.
"""

from configs.cpcl_pascal import cpcl_recipe
from csl_jax.methods.parts import cpcl_losses

#: total steps of the reference per labeled ratio (spec §5).
CITYSCAPES_STEPS = {"1_16": 22272, "1_8": 22194, "1_4": 22240, "1_2": 22320}


def get_config(arg: str = "1_8"):
    c = cpcl_recipe("cityscapes", arg, CITYSCAPES_STEPS)
    c.data.crop_size = 800
    c.model.init_from = "imagenet"
    c.batch.labeled = c.batch.unlabeled = 16
    c.loss.update(labeled="ohem_weighted", group_size=16, ohem_thresh=0.7, ohem_min_kept=800000)
    c.method.update(unsup_weight=5.0, unsup_reduction="pixel_mean",
                    class_weights=cpcl_losses.CITYSCAPES_CLASS_WEIGHTS)
    c.optim.lr = 0.01
    return c
