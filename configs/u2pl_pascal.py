r"""U2PL on Pascal VOC 2012 (docs/methods/u2pl.md; official experiments/pascal/1464/ours/config.yaml).

    python main.py --config=configs/u2pl_pascal.py:1464 --workdir=runs/u2pl_pascal_1464 \
        --config.data.root=/data/csl

`:SPLIT[,VARIANT]`. Splits: classic 92, 183, 366, 732, 1464; U2PL blended u2pl_1_16 (662), u2pl_1_8
(1323), u2pl_1_4 (2646) and 1_2 lists where shipped. Variants (`csl_jax.methods.u2pl.VARIANTS`,
docs/methods/u2pl.md "Variants"; recorded as config.method.variant):
- `reference` (default, method.variant 'u2pl'): the official code as it produced the targets below
  (its one-hot bug and key gate, its class/bank pairing of L_c, every key written and the newest
  kept, label-0 crop padding);
- `intended` ('u2pl_intended', e.g. `:1464,intended`): the paper's method (per-sample one-hot,
  class c with bank c, random capped key writes, padding ignored). No published number exists for it.

Recipe: U2PL DeepLabV3+ (model.name='u2pl'), U2PL's own deep-stem R101 ImageNet file
(model.init_from='imagenet:resnet101_u2pl', the link of U2PL's README), OS8 multi-grid, ceil-mode
max-pool, ASPP 12/24/36 without projection, 256-ch low-level path, 256-d representation head, no aux
head; crop 513; global batch 16 labeled + 16 unlabeled in loss groups of 4 (4 GPUs x 4); SGD lr 1e-3
(decoder x10), momentum 0.9, weight decay 1e-4 on all params, poly 0.9, 80 epochs over the unlabeled
set; CE; E0 = 1 supervised-only epoch (the code default); EMA 0.99 of params; drop 20 % -> 0 % of
the highest-entropy pixels, anchors below the 20 % -> 0 % entropy percentile, P > 0.3, 256 queries x
50 negatives, T 0.5, queues 30000 (class 0: 50000); L_c weight 0.25 (the reference's effective 1/W
with W = 4; the paper says 0.1).
Evaluations: 'model' (the student up to E0, the teacher after) and 'student' with the house
whole-image protocol, and 'model:center_crop' (U2PL's in-training 513 centre crop with label-0
padding as the reference: `eval.center_crop_pad_label=0`; 255 ignores the padding), which picks the
best checkpoint (`eval.best`), as the published numbers are the best in-training centre-crop results.

Targets of the `reference` variant (mIoU %, R101, teacher, in-training 513 centre crop with label-0
padding, best over training; docs/methods/u2pl.md):

| Pascal | splits | SupOnly | U2PL w/ CutMix |
|---|---|---|---|
| classic | 92/183/366/732/1464 | 45.77 / 54.92 / 65.88 / 71.69 / 72.50 | 67.98 / 69.15 / 73.66 / 76.16 / 79.49 |
| blended | 662 / 1323 / 2646 / 5291 | 67.87 / 71.55 / 75.80 / 77.13 | 77.21 / 79.01 / 79.30 / 80.50 |

Not yet measured with csl_jax.
"""

from configs import common
from csl_jax.methods import u2pl

#: U2PL's own ImageNet ResNet-101 (deep stem), linked from its README (csl_jax.models.pretrained).
IMAGENET = "imagenet:resnet101_u2pl"

#: dataset -> the U2PL recipe's differences (docs/methods/u2pl.md "Hyperparameters"); CamVid, with no
#: published recipe, follows Pascal at crop 321 from random weights.
RECIPES = {
    "pascal": dict(crop_size=513, lr=1e-3, lr_multi=10.0, weight_decay=1e-4, epochs=80, labeled_loss="ce",
                   group_size=4, sup_only_epochs=1, contrastive_weight=0.25, aux=False, protocol="whole",
                   evaluations="model,student,model:center_crop", best="model:center_crop",
                   center_crop_pad_label=0, init_from=IMAGENET),
    "cityscapes": dict(crop_size=769, lr=1e-2, lr_multi=1.0, weight_decay=5e-4, epochs=200, labeled_loss="ohem",
                       group_size=2, sup_only_epochs=0, contrastive_weight=0.125, aux=True, protocol="sliding",
                       evaluations="model,student,model:sliding_u2pl", init_from=IMAGENET),
    "camvid": dict(crop_size=321, lr=1e-3, lr_multi=10.0, weight_decay=1e-4, epochs=240, labeled_loss="ce",
                   group_size=4, sup_only_epochs=1, contrastive_weight=0.25, aux=False, protocol="whole",
                   evaluations="", init_from="none"),
}


def u2pl_recipe(dataset: str, arg: str, default_split: str):
    """The U2PL config on `dataset` ('pascal', 'cityscapes', 'camvid') for `arg` = 'SPLIT[,VARIANT]'
    (RECIPES; variants: `u2pl.VARIANTS`, default 'reference')."""
    split, _, variant = arg.partition(",")
    r = RECIPES[dataset]
    c = u2pl.configure(common.get_base_config(), variant or "reference")
    c.data.name = dataset
    c.data.split = split or default_split
    c.data.crop_size = r["crop_size"]
    c.model.init_from = r["init_from"]
    c.model.output_stride = 8
    c.model.aspp_rates = (12, 24, 36)
    c.model.reduce_width = 256  # U2PL's low-level path: 1x1 conv to 256 channels
    c.model.aux = r["aux"]
    c.batch.labeled = c.batch.unlabeled = 16
    c.loss.labeled = r["labeled_loss"]
    c.loss.group_size = r["group_size"]
    c.loss.ohem_thresh = 0.7
    c.loss.ohem_min_kept = 100000
    c.optim.lr = r["lr"]
    c.optim.lr_multi = r["lr_multi"]
    c.optim.weight_decay = r["weight_decay"]
    c.optim.epochs = r["epochs"]
    c.method.sup_only_epochs = r["sup_only_epochs"]
    c.method.contrastive_weight = r["contrastive_weight"]
    c.eval.protocol = r["protocol"]
    c.eval.evaluations = r["evaluations"]
    c.eval.best = r.get("best", "")
    c.eval.center_crop_pad_label = r.get("center_crop_pad_label", 255)
    return c


def get_config(arg: str = "1464"):
    return u2pl_recipe("pascal", arg, "1464")
