r"""UniMatch V2 on ADE20K: DINOv2 + DPT, EMA teacher, Complementary Dropout (docs/methods/unimatch_v2.md).

    python main.py --config=configs/unimatch_v2_ade20k.py:1_64,base \
        --workdir=runs/unimatch_v2_ade20k_1_64 --config.data.root=/data/csl

`:SPLIT[,ENCODER][,VARIANT]`: splits 1_64, 1_32, 1_16, 1_8, 1_4, 1_2; encoder small (default, the
official config file), base or large (the published tables); variant '' (UniMatch V2), `csl` (CSL's
selector on the EMA teacher's weak-view softmax instead of the 0.95 threshold) or `fixmatch_v2`
(FixMatch with the EMA teacher: one strong view, no Complementary Dropout). Recipe:
`common.V2_RECIPES['ade20k']` (UniMatch-V2 configs/ade20k.yaml at f6afb4d,
docs/methods/unimatch_v2.md §8). Targets (best EMA epoch, §15): S 31.48 / 38.10 / 40.69 / 44.41 /
45.76; B 38.70 / 45.00 / 46.67 / 49.84 / 52.02; L 39.95 / 44.96 / 49.33 / 52.14 / 54.16 (1/64 ...
1/4). Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1_64"):
    return common.get_v2_recipe("ade20k", arg, "unimatch_v2")
