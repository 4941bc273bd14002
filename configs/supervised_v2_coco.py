r"""Supervised DINOv2 + DPT on COCO 2017, labeled images only (UniMatch V2's baseline).

    python main.py --config=configs/supervised_v2_coco.py:1_512,base \
        --workdir=runs/sup_v2_coco_1_512 --config.data.root=/data/csl

`:SPLIT[,ENCODER]`: splits 1_512, 1_256, 1_128, 1_64, 1_32; encoder small (default), base or large.
A fixed number of samples per epoch (the labeled list repeated and cut), the per-GPU batch doubled,
AdamW as UniMatch V2, no EMA (UniMatch-V2 `supervised.py` at f6afb4d, docs/methods/unimatch_v2.md
§10); `common.V2_RECIPES['coco']`. Targets (best student epoch, §15): S 29.44 / 35.56 / 44.63 /
49.15 / 52.04; B 36.76 / 45.77 / 52.13 / 56.24 / 59.50 (1/512 ... 1/32). Not yet measured with
csl_jax.
"""

from configs import common


def get_config(arg: str = "1_512"):
    return common.get_v2_recipe("coco", arg, "supervised")
