r"""Supervised DINOv2 + DPT on Cityscapes, labeled images only (UniMatch V2's baseline).

    python main.py --config=configs/supervised_v2_cityscapes.py:1_16,base \
        --workdir=runs/sup_v2_cityscapes_1_16 --config.data.root=/data/csl

`:SPLIT[,ENCODER]`: splits 1_16, 1_8, 1_4, 1_2; encoder small (default), base or large. A fixed
number of samples per epoch (the labeled list repeated and cut), the per-GPU batch doubled, AdamW as
UniMatch V2, no EMA (UniMatch-V2 `supervised.py` at f6afb4d, docs/methods/unimatch_v2.md §10);
`common.V2_RECIPES['cityscapes']`. Targets (best student epoch, §15): S 77.15 / 80.22 / 81.69 /
82.42; B 80.79 / 82.65 / 83.98 / 84.39 (1/16 ... 1/2). Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1_16"):
    return common.get_v2_recipe("cityscapes", arg, "supervised")
