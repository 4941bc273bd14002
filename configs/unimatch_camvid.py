r"""UniMatch V1 on CamVid (SegNet version, 11 classes, 360x480 frames). csl_jax's own recipe.

    python -m data_prep camvid --raw ../shared/data/camvid --out data/tfds
    python main.py --config=configs/unimatch_camvid.py:1_8 --workdir=runs/unimatch_camvid_1_8 \
        --config.data.root=data/tfds

Splits (`:arg`): 1_16 (23 labeled / 344 unlabeled), 1_8 (46 / 321), 1_4 (92 / 275), 1_2 (184 /
183). No published semi-supervised CamVid recipe exists; as configs/csl_camvid.py, the UniMatch
Pascal recipe (OS16, ASPP 6/12/18, crop 321, global batch 8 / 8 / 8, lr 1e-3 with head x10, CE,
tau 0.95, whole-image evaluation) with 240 epochs over the small unlabeled set. FixMatch:
--config.method.name=fixmatch --config.method.second_view=none --config.method.use_fp=False.
`--mode=eval --split=test` evaluates the best checkpoint on the test split when prepared. Measured
so far: tiny-model CPU runs only, in docs/results.md (CamVid 1/8).
"""

from configs import common


def get_config(arg: str = "1_8"):
    return common.get_recipe("camvid", arg, "unimatch")
