r"""UniMatch V2 on Pascal VOC 2012: DINOv2 + DPT, EMA teacher, Complementary Dropout (docs/methods/unimatch_v2.md).

    python main.py --config=configs/unimatch_v2_pascal.py:1464,base \
        --workdir=runs/unimatch_v2_pascal_1464 --config.data.root=/data/csl

`:SPLIT[,ENCODER][,VARIANT]`: splits 92, 183, 366, 732, 1464 (classic), 1_16, 1_8, 1_4 (blended);
encoder small (default, the official config file), base or large (the published tables); variant ''
(UniMatch V2), `csl` (CSL's selector on the EMA teacher's weak-view softmax instead of the 0.95
threshold) or `fixmatch_v2` (FixMatch with the EMA teacher: one strong view, no Complementary
Dropout). Recipe: `common.V2_RECIPES['pascal']` (UniMatch-V2 configs/pascal.yaml at f6afb4d,
docs/methods/unimatch_v2.md §8). Targets (best EMA epoch, §15): S 79.03 / 85.50 / 85.85 / 86.69 /
87.82; B 86.29 / 87.92 / 88.86 / 89.98 / 90.80; L 86.44 / 87.56 / 90.29 / 91.13 / 91.21 (92 ...
1464). Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1464"):
    return common.get_v2_recipe("pascal", arg, "unimatch_v2")
