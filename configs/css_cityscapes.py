r"""CSS on Cityscapes (docs/methods/css.md; official `cross_label.py`, config/CityScapes_config_baseline.yaml).

    python main.py --config=configs/css_cityscapes.py:1_16 --workdir=runs/css_city_1_16 \
        --config.data.root=/data/csl

`:SPLIT[,VARIANT]` (variants 'reference' / 'intended' as configs/css_pascal.py). Recipe: the CSS
network (configs/css_pascal.py) at crop 769; global batch 16 + 16 in loss groups of 4 (4 GPUs x 4);
OHEM (0.7, min_kept 200000 per group of 4); no rescale of the labeled images; unlabeled step-2
rescale U(0.5, 2.0); the rest as Pascal (lr 6.4e-3 Nesterov, wd 5e-4, floor 1e-4, 80000
iterations, rep_temp 0.5 and the labeled-epoch ramp-down in the 'reference' variant).
Evaluations: 'teacher' and 'student' with the house sliding window (the reference scores one random
769 crop per image, redrawn at every evaluation).

Targets: the paper's tables (ICCV 2023, arXiv 2307.09755) could not be retrieved in this session
and the repository publishes none; no target numbers are recorded. Not yet measured with csl_jax.
A number of the reference code is the maximum over its evaluations of the teacher after every labeled
epoch (floor(|L| / 16) steps: 1_30: 6, 1_16: 11, 1_8: 23, 1_4: 46, 1_2: 93), e.g. 7,272
evaluations at 1_16 (docs/methods/css.md "Official quirks"). `--config.eval.every_steps=11`
(1_16; the step count above for the other splits) reproduces that schedule; `python -m
csl_jax.report --select best` then reads the maximum.
"""

from configs.css_pascal import css_recipe


def get_config(arg: str = "1_16"):
    return css_recipe("cityscapes", arg, "1_16")
