r"""Supervised baseline on CamVid (SegNet version, 11 classes), labeled images only.

    python -m data_prep camvid --raw ../shared/data/camvid --out data/tfds
    python main.py --config=configs/supervised_camvid.py:1_8 --workdir=runs/sup_camvid_1_8 \
        --config.data.root=data/tfds

Splits (`:arg`): 1_16 (23 labeled), 1_8 (46), 1_4 (92), 1_2 (184). The Pascal recipe of UniMatch
transferred to CamVid's 360x480 frames: R101 OS16, crop 321, global batch 16, lr 1e-3 (head x10),
80 epochs over the labeled list (160 steps at 1_8), whole-image evaluation on the 101 val images. There is no
published semi-supervised CamVid reference; csl_jax's measured figures are in docs/results.md.
`--mode=eval --split=test` evaluates the best checkpoint on the test split when prepared.
"""

from configs import common


def get_config(arg: str = "1_8"):
    return common.get_recipe("camvid", arg, "supervised")
