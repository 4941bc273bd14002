r"""CCVC on CamVid (SegNet version, 11 classes, 360x480 frames). csl_jax's own recipe.

    python -m data_prep camvid --raw ../shared/data/camvid --out data/tfds
    python main.py --config=configs/ccvc_camvid.py:1_8 --workdir=runs/ccvc_camvid_1_8 \
        --config.data.root=data/tfds

Splits (`:arg`): 1_16, 1_8, 1_4, 1_2. No published CCVC CamVid recipe exists; as the other CamVid
configs (configs/unimatch_camvid.py), the Pascal recipe at crop 321 with a global batch of 8 / 8
(loss groups and CutMix partner groups of 2) and 240 epochs over the small unlabeled set: two
DeepLabV3+ R101 branches, OS16, ASPP 6/12/18, random init (model.init_from='none'); lr 1e-3 with
the rest x10, set after each step as CCVC's; CE; CCVC's Pascal weights (w_CE 5, w_con 2, w_dis 1,
w_confident 1.5, tau 0.9 on the max logit); whole-image evaluation of branch 1, branch 2 and their
logit average (the average picks the best checkpoint). `--mode=eval --split=test` evaluates on
the test split when prepared. Measured so far: tiny-model CPU runs only, in docs/results.md (CamVid 1/8).
"""

from configs import common
from csl_jax.methods import ccvc


def get_config(arg: str = "1_8"):
    c = common.get_base_config()
    ccvc.configure(c)
    c.data.name = "camvid"
    c.data.split = arg
    c.data.crop_size = 321
    c.model.depth = 101
    c.batch.labeled = c.batch.unlabeled = 8
    c.loss.labeled = "ce"
    c.loss.group_size = 2
    c.method.mix_group = 2
    c.optim.lr = 1e-3
    c.optim.lr_multi = 10.0
    c.optim.epochs = 240
    c.eval.protocol = "whole"
    return c
