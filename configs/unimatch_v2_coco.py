r"""UniMatch V2 on COCO 2017: DINOv2 + DPT, EMA teacher, Complementary Dropout (docs/methods/unimatch_v2.md).

    python main.py --config=configs/unimatch_v2_coco.py:1_512,base \
        --workdir=runs/unimatch_v2_coco_1_512 --config.data.root=/data/csl

`:SPLIT[,ENCODER][,VARIANT]`: splits 1_512, 1_256, 1_128, 1_64, 1_32; encoder small (default, the
official config file), base or large (the published tables); variant '' (UniMatch V2), `csl` (CSL's
selector on the EMA teacher's weak-view softmax instead of the 0.95 threshold) or `fixmatch_v2`
(FixMatch with the EMA teacher: one strong view, no Complementary Dropout). Recipe:
`common.V2_RECIPES['coco']` (UniMatch-V2 configs/coco.yaml at f6afb4d, docs/methods/unimatch_v2.md
§8). Targets (best EMA epoch, §15): S 39.33 / 45.41 / 53.17 / 54.99 / 57.01; B 47.93 / 55.84 / 58.66
/ 60.42 / 63.31 (1/512 ... 1/32). Not yet measured with csl_jax.
"""

from configs import common


def get_config(arg: str = "1_512"):
    return common.get_v2_recipe("coco", arg, "unimatch_v2")
