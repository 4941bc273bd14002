r"""CSL on CamVid (SegNet version, 11 classes, 360x480 frames). csl_jax's own recipe.

    python -m data_prep camvid --raw ../shared/data/camvid --out data/tfds
    python main.py --config=configs/csl_camvid.py:1_8 --workdir=runs/csl_camvid_1_8 \
        --config.data.root=data/tfds

`:SPLIT[,VARIANT]`. Splits: 1_16 (23 labeled / 344 unlabeled), 1_8 (46 / 321), 1_4 (92 / 275), 1_2
(184 / 183). Variants as in configs/csl_pascal.py (`csl`, `csl_online`, `csl_released`); every
variant keeps the batch 8 / 8 / 8 here, with loss group 8. There is no published semi-supervised
CamVid recipe; these values are chosen here: the CSL Pascal recipe (OS8, ASPP 12/24/36, bf16
convolutions, crop 321 of the 360x480 frames, lr 1e-3 with head x10, plain CE: OHEM's min_kept
200000 would keep nearly every pixel of two 321 crops, whole-image evaluation) with 240 epochs
instead of 80, because the unlabeled set is about 30x smaller than Pascal's (240 epochs = 10,320
iterations at 1_16, 5,280 at 1_2). It starts from random weights (model.init_from='none'; add
--config.model.init_from=imagenet for the ImageNet backbone). The TMP block is 32 px at crop 321
and scales with the crop (data.block_size_reference_crop=321: a 10x10 grid at any crop). With the
EMA teacher both the teacher and the student are evaluated, the teacher picks the best checkpoint;
`--mode=eval --split=test` evaluates it on the test split when prepared. Measured so far: tiny-model
CPU runs only, in docs/results.md (CamVid 1/8).
"""

from configs import common


def get_config(arg: str = "1_8"):
    split, variant = common.split_and_variant(arg, "1_8")
    return common.get_recipe("camvid", split, "csl", variant)
