r"""CCVC on Pascal VOC 2012 (docs/methods/ccvc.md): the official recipe of the README's `CCVC_aug.py` command.

    python main.py --config=configs/ccvc_pascal.py:366 --workdir=runs/ccvc_pascal_366 \
        --config.data.root=/data/csl

Splits (`:arg`): classic 92, 183, 366, 732, 1464; blended 1_16, 1_8, 1_4 (UniMatch lists,
byte-identical to CCVC's `partitions/`). The README's example is the classic 366 split; the other
splits take the same flags. Two DeepLabV3+ branches (deep-stem R101, both backbones from the same
ImageNet file, model.init_from='imagenet'), OS16, ASPP 6/12/18; branch 2's mapping (1x1 conv, BN,
ReLU, Dropout2d 0.5); crop 512; global batch 16 labeled / 16 unlabeled, loss groups and CutMix
partner groups of 4 (the official per-GPU batch on 4 GPUs); CutMix box always on; SGD base lr 1e-3,
backbones x1, the rest x10, momentum 0.9, weight decay 1e-4 on all parameters, poly 0.9 with the lr
set after each step; 40 epochs over the unlabeled set, the reference's total steps (`STEPS`); CE;
w_CE 5, w_con 2, w_dis 1, w_confident 1.5, tau 0.9 compared with the max logit; whole-image
evaluation of branch 1, branch 2 and their logit average (the average picks the best checkpoint).

Targets: no official log for Pascal. Paper rows (CVPR 2023; NOT verified here, the PDF is not in
the workspace; backbones and crops not checked): classic 92 / 183 / 366 / 732 / 1464: 70.2 / 74.4 /
77.4 / 79.1 / 80.5, or 76.8 / 79.4 / 79.6 / 80.3 / 81.2 with the extra augmentation; blended 1/16 /
1/8 / 1/4: 77.2 / 78.4 / 79.0. Only 79.6 (Pascal) and 79.0 (blended) are corroborated, by a
third-party index. Not yet measured with csl_jax.
"""

from configs import common
from csl_jax.methods import ccvc

#: total steps of the reference per split: 40 epochs x floor(ceil(|U| / 4 GPUs) / 4 per GPU), the
#: iterations of a `DistributedSampler` loader (docs/methods/ccvc.md §5).
STEPS = {"92": 26200, "183": 26000, "366": 25520, "732": 24600, "1464": 22800, "1_16": 24800, "1_8": 23120,
         "1_4": 19840}


def split_steps(dataset: str, split: str, steps: dict) -> int:
    """The reference's total steps of `split` in `steps`; ValueError listing the valid splits."""
    if split not in steps:
        raise ValueError(f"ccvc_{dataset}: split {split!r} has no CCVC schedule; valid: {', '.join(steps)}")
    return steps[split]


def get_config(arg: str = "366"):
    c = common.get_base_config()
    ccvc.configure(c)  # the Pascal weights are ccvc.default_options()
    c.data.name = "pascal"
    c.data.split = arg
    c.optim.total_steps = split_steps("pascal", arg, STEPS)
    c.data.crop_size = 512
    c.model.init_from = "imagenet"
    c.model.depth = 101
    c.model.output_stride = 16
    c.model.aspp_rates = (6, 12, 18)
    c.batch.labeled = c.batch.unlabeled = 16
    c.loss.labeled = "ce"
    c.loss.group_size = 4
    c.method.mix_group = 4
    c.optim.lr = 1e-3
    c.optim.lr_multi = 10.0
    c.optim.epochs = 40
    c.eval.protocol = "whole"
    return c
