r"""Supervised DINOv2 + DPT on ADE20K, labeled images only (UniMatch V2's baseline).

    python main.py --config=configs/supervised_v2_ade20k.py:1_64,base \
        --workdir=runs/sup_v2_ade20k_1_64 --config.data.root=/data/csl

`:SPLIT[,ENCODER]`: splits 1_64, 1_32, 1_16, 1_8, 1_4, 1_2; encoder small (default), base or large.
A fixed number of samples per epoch (the labeled list repeated and cut), the per-GPU batch doubled,
AdamW as UniMatch V2, no EMA (UniMatch-V2 `supervised.py` at f6afb4d, docs/methods/unimatch_v2.md
§10); `common.V2_RECIPES['ade20k']`. Targets (best student epoch, §15): S 26.14 / 32.70 / 37.11 /
39.83 / 42.67; B 32.06 / 39.25 / 42.82 / 46.41 / 49.02 (1/64 ... 1/4). Not yet measured with
csl_jax.
"""

from configs import common


def get_config(arg: str = "1_64"):
    return common.get_v2_recipe("ade20k", arg, "supervised")
