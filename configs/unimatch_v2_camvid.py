r"""UniMatch V2 on CamVid (SegNet version, 11 classes, 360x480 frames): DINOv2 + DPT. csl_jax's own recipe.

    python -m data_prep camvid --raw ../shared/data/camvid --out data/tfds
    python main.py --config=configs/unimatch_v2_camvid.py:1_8,small --workdir=runs/unimatch_v2_camvid_1_8 \
        --config.data.root=data/tfds

`:SPLIT[,ENCODER][,VARIANT]`: splits 1_16, 1_8, 1_4, 1_2; encoder small (default), base, large or giant;
variant '' (UniMatch V2), `csl` (CSL's selector on the EMA teacher's weak-view softmax instead of the 0.95
threshold), `u2pl_entropy` or `fixmatch_v2`. There is no published V2 CamVid recipe:
`common.V2_RECIPES['camvid']` is V2's Pascal recipe (AdamW 5e-6, head x40, EMA 0.996, whole image
resized to a multiple of 14) at V1 CamVid's crop (322 = 23 patches) and 240 epochs, global batch 8 + 8
in one loss group (one GPU). A smaller DPT from random weights: --config.model.init_from=none and the
`common.DPT_NARROWING` fields (docs/results.md, CamVid 1/8 V2 rows). Measured: tiny-model CPU runs only.
"""

from configs import common


def get_config(arg: str = "1_8"):
    return common.get_v2_recipe("camvid", arg, "unimatch_v2")
