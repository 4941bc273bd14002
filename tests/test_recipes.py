"""The published recipes as configs: CSL variants, loss groups, initial weights, TMP block scaling."""

import pytest

from configs import (common, csl_ade20k, csl_camvid, csl_cityscapes, csl_coco, csl_pascal, demo, supervised_ade20k,
                     supervised_camvid, supervised_coco, unimatch_ade20k, unimatch_coco, unimatch_pascal)
from csl_jax import methods

# The option sets of docs/methods/csl.md §10, written out here (not read from the code).
SPEC = dict(selector="csl", teacher="ema", ema_momentum=0.99, alpha=8.0, variance_scaling=False, eps=1e-8,
            second_view="tmp", second_view_source="strong2", use_fp=True, mix_pass_bn="train",
            strong_pass_updates_bn=False)
VARIANT_TABLE = {
    "csl": SPEC,
    "csl_online": dict(SPEC, teacher="online"),
    "csl_released": dict(SPEC, teacher="online", alpha=2.0, variance_scaling=True, second_view="cutmix",
                         second_view_source="strong", strong_pass_updates_bn=True),
}
# (dataset config, variant) -> (global batch labeled = unlabeled, loss group, epochs)
BATCH_TABLE = {
    (csl_pascal, "csl"): (8, 8, 80), (csl_pascal, "csl_online"): (8, 8, 80), (csl_pascal, "csl_released"): (32, 32, 80),
    (csl_cityscapes, "csl"): (8, 2, 240), (csl_cityscapes, "csl_released"): (8, 2, 240),
    (csl_camvid, "csl"): (8, 8, 240), (csl_camvid, "csl_released"): (8, 8, 240),
}


@pytest.mark.parametrize("variant", list(VARIANT_TABLE))
@pytest.mark.parametrize("module", [csl_pascal, csl_cityscapes, csl_camvid])
def test_csl_variants_have_their_option_sets(module, variant):
    config = module.get_config(f"1_8,{variant}")
    assert config.data.split == "1_8"
    assert config.method.name == "csl" and config.method.variant == variant
    for key, value in VARIANT_TABLE[variant].items():
        assert config.method[key] == value, (variant, key)
    methods.check_config(config)
    if (module, variant) in BATCH_TABLE:
        batch, group, epochs = BATCH_TABLE[(module, variant)]
        assert (config.batch.labeled, config.batch.unlabeled, config.loss.group_size, config.optim.epochs) == \
            (batch, batch, group, epochs)


def test_released_pascal_schedule_is_the_logged_one():
    """csl_released at Pascal 1/4: 7,936 unlabeled images / 32 per step = 248 steps per epoch x 80."""
    config = csl_pascal.get_config("1_4,csl_released")
    assert (10582 - 2646) // config.batch.unlabeled * config.optim.epochs == 19840
    assert (config.optim.lr, config.optim.lr_multi, config.data.crop_size) == (1e-3, 10.0, 321)


def test_config_argument_parsing():
    assert common.split_and_variant("", "1464") == ("1464", "csl")
    assert common.split_and_variant("92", "1464") == ("92", "csl")
    assert common.split_and_variant("csl_online", "1464") == ("1464", "csl_online")
    assert common.split_and_variant("1_4,csl_released", "1464") == ("1_4", "csl_released")
    with pytest.raises(ValueError, match="SPLIT\\[,VARIANT\\]"):
        common.split_and_variant("1_4,csl_spec", "1464")
    config = csl_pascal.get_config()
    config.method.variant = "csl_v2"
    with pytest.raises(ValueError, match="config.method.variant='csl_v2' is not a variant of 'csl'"):
        methods.check_config(config)


def test_published_recipes_start_from_imagenet_weights():
    for config in (csl_pascal.get_config(), csl_cityscapes.get_config(), unimatch_pascal.get_config(),
                   common.get_recipe("cityscapes", "1_16", "supervised")):
        assert config.model.init_from == "imagenet"
    for config in (csl_camvid.get_config(), supervised_camvid.get_config(), demo.get_config(), demo.get_config("csl")):
        assert config.model.init_from == "none"


def test_lr_after_step_per_recipe():
    """UniMatch's loops (unimatch.py, fixmatch.py, supervised.py) set the lr after each step; CSL's
    Lightning module steps a LambdaLR after each step, so its step t runs at poly(t) (docs/methods/csl.md §11)."""
    for dataset in common.DATASET_RECIPES:
        for method in ("supervised", "unimatch", "fixmatch"):
            assert common.get_recipe(dataset, "1_8", method).optim.lr_after_step, (dataset, method)
        for variant in VARIANT_TABLE:
            assert not common.get_recipe(dataset, "1_8", "csl", variant).optim.lr_after_step, (dataset, variant)
    assert not demo.get_config().optim.lr_after_step and not common.get_base_config().optim.lr_after_step


def test_tmp_block_scaling_per_recipe():
    # Pascal and Cityscapes: the reference's 32 px at any crop; CamVid and the demo: 32 px at 321, scaled
    assert (csl_pascal.get_config().data.block_size_reference_crop,
            csl_cityscapes.get_config().data.block_size_reference_crop) == (0, 0)
    assert csl_camvid.get_config().data.block_size_reference_crop == 321
    assert demo.get_config("csl").data.block_size_reference_crop == 321


def test_old_saved_method_configs_still_load():
    """A config saved before `variant` and `second_view_source` existed builds the same method."""
    config = csl_pascal.get_config()
    del config.method["variant"]
    del config.method["second_view_source"]
    methods.check_config(config)
    method = methods.build_method(config, 21)
    assert (method.opts.variant, method.opts.second_view_source) == ("", "strong2")


# UniMatch V1's COCO recipe (LiheYoung/UniMatch configs/coco.yaml at 0324f3d; spec
# datasets-coco-ade20k.md §3.1), written out: (backbone, OS, ASPP rates, crop, lr, lr_multi, epochs).
COCO = ("xception65", 16, (6, 12, 18), 513, 0.004, 10.0, 30)
ADE20K_OURS = ("resnet", 16, (6, 12, 18), 513, 0.004, 10.0, 60)


@pytest.mark.parametrize("module,arg,network,batch", [
    (unimatch_coco, "1_32", COCO, 8), (csl_coco, "1_32", COCO, 8), (supervised_coco, "1_32", COCO, 16),
    (csl_coco, "1_32,csl_released", COCO, 8), (unimatch_ade20k, "1_8", ADE20K_OURS, 8),
    (csl_ade20k, "1_8", ADE20K_OURS, 8), (supervised_ade20k, "1_8", ADE20K_OURS, 16)])
def test_coco_and_ade20k_recipes(module, arg, network, batch):
    config = module.get_config(arg)
    assert config.data.name == ("coco" if network is COCO else "ade20k") and config.data.split == arg.split(",")[0]
    m = config.model
    assert (m.backbone, m.output_stride, tuple(m.aspp_rates), config.data.crop_size, config.optim.lr,
            config.optim.lr_multi, config.optim.epochs) == network
    assert (config.batch.labeled, config.model.init_from, config.eval.protocol, config.loss.labeled) == \
        (batch, "imagenet", "whole", "ce")
    assert config.optim.lr_after_step == (config.method.name != "csl")
    if config.method.name != "supervised":
        assert (config.batch.unlabeled, config.loss.group_size, config.method.tau) == (8, 2, 0.95)
    methods.check_config(config)


def test_csl_keeps_os8_only_where_its_paper_trains_it():
    assert (csl_pascal.get_config().model.output_stride, csl_cityscapes.get_config().model.output_stride) == (8, 8)
    assert csl_coco.get_config().model.dtype == csl_pascal.get_config().model.dtype == "bfloat16"
    assert unimatch_coco.get_config().model.dtype == "float32"
