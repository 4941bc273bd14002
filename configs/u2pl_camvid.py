r"""U2PL on CamVid (SegNet version, 11 classes, 360x480 frames). csl_jax's own recipe.

    python main.py --config=configs/u2pl_camvid.py:1_8 --workdir=runs/u2pl_camvid_1_8 \
        --config.data.root=data/tfds

`:SPLIT[,VARIANT]`: splits 1_16, 1_8, 1_4, 1_2; variants `reference` (default) and `intended`
as configs/u2pl_pascal.py. No published U2PL CamVid recipe exists: the Pascal recipe
(configs/u2pl_pascal.py: loss groups of 4, lr 1e-3 with the decoder x10, CE, E0 = 1, L_c weight
0.25) at crop 321 from random weights (model.init_from='none'), 240 epochs over the small
unlabeled set as the other CamVid configs, whole-image evaluation of 'model', 'teacher' and
'student'. Measured so far: the tiny-model CPU runs of docs/results.md (CamVid 1/8).
"""

from configs.u2pl_pascal import u2pl_recipe


def get_config(arg: str = "1_8"):
    return u2pl_recipe("camvid", arg, "1_8")
