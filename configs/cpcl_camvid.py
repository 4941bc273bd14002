r"""CPCL on CamVid (SegNet version, 11 classes, 360x480 frames). csl_jax's own recipe.

    python -m data_prep camvid --raw ../shared/data/camvid --out data/tfds
    python main.py --config=configs/cpcl_camvid.py:1_8 --workdir=runs/cpcl_camvid_1_8 \
        --config.data.root=data/tfds

Splits (`:SPLIT[,VARIANT]`): 1_16, 1_8, 1_4, 1_2; variants as configs/cpcl_pascal.py: 'head'
(default, leofansq/CPCL at HEAD f0e1800) or 'first_commit' (0bf0c50). No published CPCL CamVid
recipe exists: the VOC recipe of that variant (configs/cpcl_pascal.py: R50 branches, CPCL geometry,
batch 8 + 8 + 8 in one loss group, lr 0.005 on every parameter, decay on kernels only, CE, lambda_u
1; HEAD: confidence 'pixel', 'pixel_mean') at crop 321, random init (model.init_from='none') and
240 epochs over the unlabeled set, as the other CamVid configs; whole-image evaluation of branch 1
and branch 2 (branch 1 picks the best checkpoint). Measured so far: tiny-model CPU runs only, in
docs/results.md (CamVid 1/8), made with the first commit's options (confidence 'reference' =
'first_commit', 'valid_mean'), the defaults before HEAD's became them.
"""

from configs import cpcl_pascal


def get_config(arg: str = "1_8"):
    split, _, variant = arg.partition(",")
    c = cpcl_pascal.get_config(f"1_8,{variant}")
    c.data.name = "camvid"
    c.data.split = split or "1_8"
    c.data.crop_size = 321
    c.model.init_from = "none"
    c.optim.total_steps = 0
    c.optim.epochs = 240
    c.eval.protocol = "whole"
    return c
