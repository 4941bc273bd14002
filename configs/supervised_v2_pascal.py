r"""Supervised DINOv2 + DPT on Pascal VOC 2012, labeled images only (UniMatch V2's baseline).

    python main.py --config=configs/supervised_v2_pascal.py:1464,base \
        --workdir=runs/sup_v2_pascal_1464 --config.data.root=/data/csl

`:SPLIT[,ENCODER]`: splits 92, 183, 366, 732, 1464 (classic), 1_16, 1_8, 1_4 (blended); encoder
small (default), base or large. A fixed number of samples per epoch (the labeled list repeated and
cut), the per-GPU batch doubled, AdamW as UniMatch V2, no EMA (UniMatch-V2 `supervised.py` at
f6afb4d, docs/methods/unimatch_v2.md §10); `common.V2_RECIPES['pascal']`. Targets (best student
epoch, §15): S 66.98 / 75.63 / 81.82 / 83.69 / 85.56; B 76.86 / 82.07 / 85.27 / 87.15 / 88.30 (92
... 1464). Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1464"):
    return common.get_v2_recipe("pascal", arg, "supervised")
