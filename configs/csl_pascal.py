r"""CSL on Pascal VOC 2012 (docs/methods/csl.md §10-11): UniMatch V1 + CSL soft weights.

    python main.py --config=configs/csl_pascal.py:1464 --workdir=runs/csl_pascal_1464 \
        --config.data.root=/data/csl
    python main.py --config=configs/csl_pascal.py:1_4,csl_released --workdir=runs/csl_rel_1_4 ...

`:SPLIT[,VARIANT]`. Splits: classic 92, 183, 366, 732, 1464; blended 1_16, 1_8, 1_4; u2pl_1_16,
u2pl_1_8, u2pl_1_4 (use --config.data.crop_size=513 for the U2PL lists). Variants (recorded as
config.method.variant):
- `csl` (default, the spec copy): EMA teacher 0.99, alpha 8, unscaled residual variance, TMP
  (p 0.5, cover 0.7, block 32), global batch 8 labeled / 8 unlabeled / 8 mix, loss group 8 (its
  one-GPU batch), 80 epochs over the unlabeled set (79,360 steps at 1/4).
- `csl_online`: the spec with the official online teacher (student pseudo-labels).
- `csl_released`: the released code (ljs11528/pseudo-label-selection): online teacher, alpha 2,
  variance scaled by (C-1)^2/(2(1-p)), second CutMix view pasted from the mix batch's first strong
  view, global batch 32 / 32 / 32 on one GPU (loss group 32), lr 1e-3, 80 epochs (19,840 steps at
  1/4). Its log's five complete Pascal 1/4 runs reach 78.06-78.63 (best val mIoU).
All: DeepLabV3+ deep-stem R101 from ImageNet (model.init_from='imagenet', downloaded once; random
init only with --config.model.init_from=none), OS8, ASPP 12/24/36, bf16 convolutions; crop 321;
SGD lr 1e-3 (head x10), poly; CE; FP; whole-image evaluation (with an EMA teacher: the teacher and
the student, the teacher picks the best checkpoint). Targets: the CSL paper's tables. Not yet
measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1464"):
    split, variant = common.split_and_variant(arg, "1464")
    return common.get_recipe("pascal", split, "csl", variant)
