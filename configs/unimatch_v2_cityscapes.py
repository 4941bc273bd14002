r"""UniMatch V2 on Cityscapes: DINOv2 + DPT, EMA teacher, Complementary Dropout (docs/methods/unimatch_v2.md).

    python main.py --config=configs/unimatch_v2_cityscapes.py:1_16,base \
        --workdir=runs/unimatch_v2_cityscapes_1_16 --config.data.root=/data/csl

`:SPLIT[,ENCODER][,VARIANT]`: splits 1_16, 1_8, 1_4, 1_2; encoder small (default, the official
config file), base or large (the published tables); variant '' (UniMatch V2), `csl` (CSL's selector
on the EMA teacher's weak-view softmax instead of the 0.95 threshold) or `fixmatch_v2` (FixMatch
with the EMA teacher: one strong view, no Complementary Dropout). Recipe:
`common.V2_RECIPES['cityscapes']` (UniMatch-V2 configs/cityscapes.yaml at f6afb4d,
docs/methods/unimatch_v2.md §8). Targets (best EMA epoch, §15): S 80.55 / 81.86 / 82.39 / 82.61; B
83.60 / 84.30 / 84.51 / 85.14 (1/16 ... 1/2). Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1_16"):
    return common.get_v2_recipe("cityscapes", arg, "unimatch_v2")
