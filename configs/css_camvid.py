r"""CSS on CamVid (SegNet version, 11 classes, 360x480 frames). csl_jax's own recipe.

    python main.py --config=configs/css_camvid.py:1_8 --workdir=runs/css_camvid_1_8 \
        --config.data.root=data/tfds

`:SPLIT[,VARIANT]`: splits 1_16, 1_8, 1_4, 1_2; variants 'reference' (rep_temp 0.5, labeled-epoch
ramp-down; default) and 'intended' (rep_temp 0.1, ramp-down over the run), see configs/css_pascal.py.
No published CSS CamVid recipe exists: the Pascal recipe (configs/css_pascal.py) at crop 321 from
random weights, global batch 8 + 8 in one loss group of 8, 240 epochs of the unlabeled set
(9,600 iterations at 1_8), whole-image evaluation of 'teacher' and 'student'. Measured so far: the
tiny-model CPU runs of docs/results.md (CamVid 1/8), whose variant is stated there.
"""

from configs.css_pascal import css_recipe


def get_config(arg: str = "1_8"):
    return css_recipe("camvid", arg, "1_8")
