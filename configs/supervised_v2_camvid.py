r"""Supervised baseline on CamVid with UniMatch V2's network (DINOv2 + DPT), labeled images only.

    python main.py --config=configs/supervised_v2_camvid.py:1_8,small --workdir=runs/sup_v2_camvid_1_8 \
        --config.data.root=data/tfds

`:SPLIT[,ENCODER]`: splits 1_16, 1_8, 1_4, 1_2; encoder small (default), base, large or giant. Recipe
`common.V2_RECIPES['camvid']` (csl_jax's own, see configs/unimatch_v2_camvid.py): global batch 16 and
epochs of 640 samples (`data.epoch_samples`: at 1/8 as many steps as UniMatch V2's epoch over the
unlabeled set), 240 epochs. Measured: tiny-model CPU runs only (docs/results.md).
"""

from configs import common


def get_config(arg: str = "1_8"):
    return common.get_v2_recipe("camvid", arg, "supervised")
