r"""Demo: a tiny DeepLabV3+ on the generated synthetic dataset, on CPU in a few minutes.

    python main.py --config=configs/demo.py --workdir=runs/demo

main.py generates the synthetic dataset into `data.root` on first use (no download; see
`csl_jax.data.ensure_prepared`). `:supervised` (the default, the supervised baseline), `:csl`
(also `:csl_online`, `:csl_released`, the CSL variants), `:unimatch` or `:fixmatch` pick the method, e.g.
`--config=configs/demo.py:csl` (its EMA teacher and student are both evaluated; the teacher's mIoU
is the one printed). It starts from random weights (model.init_from='none'). Prints the val mIoU at the end.
"""

import ml_collections

from configs import common
from csl_jax.methods import weak_to_strong


def get_config(arg: str = "supervised"):
    c = common.get_base_config()
    c.data.name = "synthetic"
    c.data.root = "data/synthetic"
    c.data.split = "1_4"
    c.data.crop_size = 64
    # what data_prep.synthetic.prepare generates into data.root on first use; one image shape so
    # that evaluation compiles once
    c.data.synthetic = ml_collections.ConfigDict(dict(num_train=256, num_val=64, image_size=(80, 80), seed=0))
    c.data.num_workers = 0
    c.data.block_size_reference_crop = 321  # TMP block 32 px at 321, scaled to the crop (6.4 px)
    c.model.depth = 50
    common.tiny_model(c)
    c.model.output_stride = 8
    c.model.aspp_rates = (2, 4, 6)
    c.batch.labeled = 8
    c.batch.unlabeled = 8
    c.optim.lr = 0.02
    c.optim.lr_multi = 1.0
    c.optim.total_steps = 300
    c.eval.protocol = "whole"
    c.eval.every_steps = 150
    c.log_every_steps = 25
    c.checkpoint_every_steps = 150
    if arg == "supervised":
        c.method.name = arg
    elif arg in weak_to_strong.VARIANTS:  # 'csl', 'csl_online', 'csl_released'
        c.method = weak_to_strong.variant_options(arg)
        c.loss.group_size = 8  # CSL normalises over its whole one-GPU batch
    else:
        c.method = weak_to_strong.default_options(arg)  # 'unimatch' or 'fixmatch'
    return c
