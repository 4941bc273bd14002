"""Shared defaults of every csl_jax config. Config files import `get_base_config()` and override.

Batch sizes are GLOBAL (over all devices and hosts): one GPU and eight GPUs train the same recipe.
Loss normalisation groups (`loss.group_size`) equal the reference per-GPU batch: each loss is
normalised over the valid pixels of `group_size` consecutive images of the global batch, also when
a group spans devices, so results do not depend on the device count either (UniMatch: 2; CSL
Pascal: 8, its spec copy's one-GPU batch; csl_released Pascal: 32). `eval.evaluations` lists what
each evaluation step runs (a predict function of the method, a split, a protocol) and `eval.best`
the one that picks the best checkpoint.
"""

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
    """The base config: supervised DeepLabV3+ R101 OS16 on Pascal at crop 321 (overridden below)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # --- model (csl_jax/models, docs/models.md) ---
    c.model = ml_collections.ConfigDict()
    c.model.name = "deeplabv3plus"  # csl_jax.models registry
    # 'resnet' (model.depth, model.stem) | 'xception65' (UniMatch V1's COCO backbone, docs/models.md "Xception-65")
    c.model.backbone = "resnet"
    c.model.depth = 101
    c.model.stem = "deep"
    c.model.output_stride = 16
    c.model.multi_grid = False
    c.model.aspp_rates = (6, 12, 18)
    c.model.maxpool_ceil = False
    c.model.width = 64
    c.model.blocks = ml_collections.FieldReference(None, field_type=tuple)
    c.model.head_width = 256
    c.model.reduce_width = 48
    c.model.dtype = "float32"  # compute dtype of convolutions: float32 | bfloat16
    # train-time kernels (docs/models.md): 'fast' | 'reference' (the plain JAX formulations, for A/B checks)
    c.model.kernels = "fast"
    c.model.remat = False
    # Initial weights (csl_jax/models/pretrained.py, docs/models.md): 'none' = random init; a name
    # from the pretrained registry ('imagenet' = the ImageNet backbone of model.depth and model.stem,
    # 'imagenet:resnet101', 'torchvision:resnet50', ...), downloaded once into the user cache; or a
    # path to a converted Flax checkpoint or a PyTorch .pth file. Published recipes set 'imagenet'.
    c.model.init_from = "none"
    c.model.init_kind = "auto"

    # --- data (csl_jax/data, docs/data.md) ---
    c.data = ml_collections.ConfigDict()
    c.data.name = "pascal"
    c.data.root = "data/tfds"
    c.data.split = "1464"
    c.data.crop_size = 321
    c.data.num_workers = 4
    c.data.prefetch = 2
    # > 0: streams with epoch_of='fixed' (supervised) repeat the labeled list to this many samples per
    # epoch when it is shorter (UniMatch V2's supervised baseline: 3000 Pascal/Cityscapes, 6000 ADE20K)
    c.data.epoch_samples = 0
    # strong views: keep the colour-jittered padding of the padded crop (UniMatch V2's reference) instead
    # of resetting it to black (csl_jax's default; the loss ignores those pixels either way)
    c.data.keep_jittered_padding = False
    c.data.cutmix_prob = 0.5
    c.data.tmp_prob = 0.5
    c.data.cover_ratio = 0.7
    c.data.block_size = 32  # TMP block side in pixels ...
    c.data.block_size_reference_crop = 0  # ... at this crop, scaled to data.crop_size (0 = at every crop)
    # custom datasets (name='custom'): list files of '<image> [<mask>]' lines, paths relative to data.root.
    # Prepared datasets: labeled_list (and optionally unlabeled_list) of train ids replaces data.split;
    # unlabeled default: the rest of the prepared train pool.
    c.data.labeled_list = ""
    c.data.unlabeled_list = ""
    c.data.val_list = ""
    c.data.num_classes = 0
    c.data.class_names = ()

    # --- global batch sizes ---
    c.batch = ml_collections.ConfigDict()
    c.batch.labeled = 8
    c.batch.unlabeled = 8
    c.batch.accum_steps = 1  # gradient accumulation: micro-batches per optimizer step

    # --- losses ---
    c.loss = ml_collections.ConfigDict()
    c.loss.labeled = "ce"  # ce | ohem
    c.loss.group_size = 2  # images per normalisation group (= the reference per-GPU batch)
    c.loss.ohem_thresh = 0.7
    c.loss.ohem_min_kept = 200000

    # --- method (csl_jax/methods) ---
    c.method = ml_collections.ConfigDict()
    c.method.name = "supervised"

    # --- optimiser: SGD momentum or AdamW, torch-style weight decay, poly schedule ---
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"  # 'sgd' | 'adamw' (torch.optim.AdamW: betas (0.9, 0.999), eps 1e-8, decoupled decay)
    c.optim.lr = 1e-3
    c.optim.lr_multi = 10.0  # lr of everything but the backbone = lr * lr_multi
    c.optim.momentum = 0.9  # SGD only
    c.optim.nesterov = False  # SGD only
    c.optim.weight_decay = 1e-4
    c.optim.weight_decay_on = "all"  # "all" params, or "kernels" only (conv/dense weights, not BN/bias)
    c.optim.poly_power = 0.9
    c.optim.min_lr = 0.0  # floor of the poly schedule (lr never decays below it)
    # True: step 0 runs at lr and step t >= 1 at poly(t - 1), as loops that set the lr after each
    # step (UniMatch, CCVC); False: step t runs at poly(t) (csl_jax/optim.py)
    c.optim.lr_after_step = False
    c.optim.epochs = 80
    c.optim.total_steps = 0  # > 0 overrides epochs x iterations per epoch

    # --- evaluation (csl_jax/evaluation/protocols.py, docs/protocol.md §4) ---
    c.eval = ml_collections.ConfigDict()
    # whole | sliding | sliding_u2pl | sliding_cpcl | center_crop | whole_resize | sliding_shifted
    c.eval.protocol = "whole"
    c.eval.resize_multiple = 14  # 'whole_resize' only: each side resized to the nearest multiple of this
    # Evaluations at each eval step, comma-separated `PREDICT[@SPLIT][:PROTOCOL]` (split default
    # val, protocol default eval.protocol), e.g. "teacher,student" or "model@test:sliding".
    # "" = every predict function of the method on val. `best` names the one that picks the best
    # checkpoint ("" = the method's: the EMA teacher, or the only network).
    c.eval.evaluations = ""
    c.eval.best = ""
    c.eval.every_steps = 0  # 0 = once per epoch
    c.eval.batch_size = 8  # images (or tiles) per evaluation batch, over all devices
    c.eval.max_images = 0  # 0 = the whole val set
    c.eval.num_plot_images = 4
    # 'whole' only: pad images to a multiple of this (0 = off, the exact protocol). Datasets of many
    # image sizes (Pascal) otherwise compile one program per size; padding changes border pixels.
    c.eval.pad_to_multiple = 0
    # 'center_crop' only: the label of the crop's padding (255 = ignored; 0 = background, U2PL's
    # in-training Pascal metric, where every VOC image is padded to 513 and the padding counts).
    c.eval.center_crop_pad_label = 255

    # --- logging and checkpoints ---
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 2
    # Stop (with a checkpoint) after this many steps in this invocation, e.g. to fit a cluster job's
    # time limit; the next invocation resumes. 0 = run to the end of the schedule.
    c.stop_after_steps = 0
    c.compilation_cache_dir = ""  # XLA programs kept across runs: "" = ~/.cache/csl_jax/xla, "none" = off
    return c


#: The tiny DeepLabV3+ of the demo, the tests and the benchmarks' CPU smoke runs: one bottleneck
#: block per ResNet stage and narrow layers (~0.1 M parameters at 5 classes). Depth, output stride
#: and ASPP rates stay the caller's.
TINY_MODEL = dict(blocks=(1, 1, 1, 1), width=8, head_width=32, reduce_width=8)


#: The tiny DINOv2 + DPT of the tests and the benchmarks' CPU runs (`config.model.name='dpt'` fields over an
#: encoder's): D 16, 4 blocks of 2 heads, all tapped, a 2 x 2 stored position grid (the identity at crop
#: 28), head features 8 (~30 k parameters at 5 classes).
TINY_DPT = dict(embed_dim=16, depth=4, num_heads=2, taps=(0, 1, 2, 3), pos_grid=2, features=8,
                out_channels=(4, 4, 8, 8))


def tiny_model(c: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
    """Sets `c.model` to `TINY_MODEL` (with `overrides` of its fields, e.g. width=4); returns `c`."""
    unknown = sorted(set(overrides) - set(TINY_MODEL))
    if unknown:
        raise ValueError(f"tiny_model overrides {unknown} are not fields of TINY_MODEL {sorted(TINY_MODEL)}")
    c.model.update(dict(TINY_MODEL, **overrides))
    return c


#: CSL recipe changes per variant and dataset (docs/methods/csl.md §10-11): batch sizes (labeled =
#: unlabeled), epochs and the loss group. The spec copy trains Pascal with 8 images on one GPU (group
#: 8); the released code with 32 on one GPU at lr 1e-3 for 80 epochs (19,840 steps at 1/4, group 32).
#: Cityscapes keeps UniMatch's per-GPU 2 (no CSL Cityscapes recipe is released); CamVid follows Pascal.
CSL_RECIPES = {
    ("pascal", "csl"): dict(group_size=8), ("pascal", "csl_online"): dict(group_size=8),
    ("pascal", "csl_released"): dict(batch=32, group_size=32),
    ("camvid", "csl"): dict(group_size=8), ("camvid", "csl_online"): dict(group_size=8),
    ("camvid", "csl_released"): dict(group_size=8),
}


def split_and_variant(arg: str, default_split: str) -> tuple[str, str]:
    """'SPLIT[,VARIANT]' of a CSL config argument -> (split, variant); variant default 'csl'.

    e.g. '1_4,csl_released' -> ('1_4', 'csl_released'); '' -> (default_split, 'csl'). The variant
    may also come alone ('csl_released' -> (default_split, 'csl_released')).
    """
    from csl_jax.methods import weak_to_strong

    parts = [p.strip() for p in arg.split(",") if p.strip()] if arg else []
    variant = parts.pop() if parts and parts[-1] in weak_to_strong.VARIANTS else "csl"
    if len(parts) > 1:
        raise ValueError(f"config argument {arg!r}: expected 'SPLIT[,VARIANT]' with VARIANT one of "
                         f"{sorted(weak_to_strong.VARIANTS)}")
    return (parts[0] if parts else default_split), variant


# Published recipes per dataset (docs/protocol.md, docs/methods/unimatch.md, docs/methods/csl.md §11,
# docs/data.md "COCO" and "ADE20K"). CamVid has no published semi-supervised recipe: Pascal's, with
# 240 epochs for the semi-supervised methods because its unlabeled set is ~30x smaller (240 epochs =
# 9,600 iterations at 1/8). COCO is UniMatch V1's (configs/coco.yaml at 0324f3d: Xception-65 OS16,
# crop 513, lr 0.004, 30 epochs, whole image at its original size). ADE20K has no ResNet-era recipe
# upstream: ours, COCO's with the deep-stem R101 and V2's 60 ADE20K epochs. `csl_os8`: CSL's paper
# recipe trains OS8 with ASPP 12/24/36 (Pascal, Cityscapes); its COCO setting is not released, so
# COCO and ADE20K keep UniMatch's OS16 network for CSL too.
DATASET_RECIPES = {
    "pascal": dict(crop_size=321, lr=1e-3, lr_multi=10.0, epochs=80, semi_epochs=80, labeled_loss="ce",
                   protocol="whole", tau=0.95),
    "cityscapes": dict(crop_size=801, lr=5e-3, lr_multi=1.0, epochs=240, semi_epochs=240, labeled_loss="ohem",
                       protocol="sliding", tau=0.0),
    "camvid": dict(crop_size=321, lr=1e-3, lr_multi=10.0, epochs=80, semi_epochs=240, labeled_loss="ce",
                   protocol="whole", tau=0.95, block_size_reference_crop=321, imagenet=False),
    "coco": dict(crop_size=513, lr=4e-3, lr_multi=10.0, epochs=30, semi_epochs=30, labeled_loss="ce",
                 protocol="whole", tau=0.95, backbone="xception65", csl_os8=False),
    "ade20k": dict(crop_size=513, lr=4e-3, lr_multi=10.0, epochs=60, semi_epochs=60, labeled_loss="ce",
                   protocol="whole", tau=0.95, csl_os8=False),
}


def get_recipe(dataset: str, split: str, method: str, variant: str = "csl") -> ml_collections.ConfigDict:
    """The config of `method` ('supervised', 'csl', 'unimatch', 'fixmatch') on `dataset`, `split`.

    Supervised: labeled images only, global batch 16 (UniMatch doubles the semi-supervised 8),
    epochs over the labeled list. Semi-supervised: 8 labeled + 8 unlabeled (+ 8 mix), epochs over
    the unlabeled set, the method's option preset. CSL: OS8, ASPP 12/24/36, bf16 convolutions, the
    options of `variant` ('csl', 'csl_online', 'csl_released') and its `CSL_RECIPES` entry. Pascal
    and Cityscapes start from the ImageNet backbone (model.init_from='imagenet'); CamVid from
    random weights, with the TMP block scaled to the crop (32 px at 321). The lr is set after each
    step (`optim.lr_after_step`) except for CSL.
    """
    r = DATASET_RECIPES[dataset]
    c = get_base_config()
    c.data.name = dataset
    c.data.split = split
    c.data.crop_size = r["crop_size"]
    c.data.block_size_reference_crop = r.get("block_size_reference_crop", 0)
    c.loss.labeled = r["labeled_loss"]
    c.model.backbone = r.get("backbone", c.model.backbone)
    if r.get("imagenet", True):  # the published recipes start from ImageNet weights
        c.model.init_from = "imagenet"
    c.optim.lr = r["lr"]
    c.optim.lr_multi = r["lr_multi"]
    # UniMatch's loops set the lr after each step; CSL's Lightning LambdaLR gives step t poly(t)
    c.optim.lr_after_step = method != "csl"
    c.eval.protocol = r["protocol"]
    if method == "supervised":
        c.batch.labeled = 16
        c.optim.epochs = r["epochs"]
        return c
    from csl_jax.methods import weak_to_strong

    c.batch.labeled = c.batch.unlabeled = 8
    c.optim.epochs = r["semi_epochs"]
    c.method = weak_to_strong.variant_options(variant) if method == "csl" else weak_to_strong.default_options(method)
    c.method.tau = r["tau"]
    if method == "csl" and r.get("csl_os8", True):
        c.model.output_stride = 8
        c.model.aspp_rates = (12, 24, 36)
    if method == "csl":
        c.model.dtype = "bfloat16"
        recipe = CSL_RECIPES.get((dataset, variant), {})
        c.batch.labeled = c.batch.unlabeled = recipe.get("batch", c.batch.labeled)
        c.loss.group_size = recipe.get("group_size", c.loss.group_size)
    return c


#: UniMatch V2 recipes (UniMatch-V2 configs/*.yaml at f6afb4d; docs/methods/unimatch_v2.md §8, §10):
#: crop (a multiple of 14), global batch labeled = unlabeled (4 GPUs x the per-GPU batch), the loss
#: group (the per-GPU batch), epochs over the unlabeled set, L_x, the evaluation protocol, and the
#: supervised baseline's samples per epoch (`data.epoch_samples`; its batch is doubled).
V2_RECIPES = {
    "pascal": dict(crop_size=518, batch=16, group_size=4, epochs=60, labeled_loss="ce", protocol="whole_resize",
                   epoch_samples=3000),
    "cityscapes": dict(crop_size=798, batch=8, group_size=2, epochs=180, labeled_loss="ohem",
                       protocol="sliding_shifted", epoch_samples=3000),
    "ade20k": dict(crop_size=518, batch=8, group_size=2, epochs=60, labeled_loss="ce", protocol="whole_resize",
                   epoch_samples=6000),
    "coco": dict(crop_size=518, batch=16, group_size=4, epochs=20, labeled_loss="ce", protocol="whole_resize",
                 epoch_samples=30000),
    # csl_jax's own (no published V2 CamVid recipe): Pascal's at V1 CamVid's crop and epochs on one GPU
    # (crop 322 = 23 patches, global batch 8 in one loss group; the supervised epoch = one semi epoch's steps
    # at 1/8: 40 x 16 samples)
    "camvid": dict(crop_size=322, batch=8, group_size=8, epochs=240, labeled_loss="ce", protocol="whole_resize",
                   epoch_samples=640),
}
V2_ENCODERS = ("small", "base", "large", "giant")
#: the DPT fields (csl_jax.models.dpt ENCODER_FIELDS, HEAD_FIELDS) a run may set off its encoder's values from
#: the command line, by type (unset: the encoder's), e.g. a tiny model from random weights:
#: --config.model.embed_dim=32 --config.model.depth=4 --config.model.taps="(0,1,2,3)"
DPT_NARROWING = {"embed_dim": int, "depth": int, "num_heads": int, "ffn": str, "pos_grid": int, "patch_size": int,
                 "features": int, "taps": tuple, "out_channels": tuple}
#: config-argument variants: CSL's selector, U2PL's entropy partition, FixMatch with the EMA teacher
V2_VARIANTS = ("csl", "u2pl_entropy", "fixmatch_v2")


def parse_v2_argument(arg: str, default_split: str) -> tuple[str, str, str]:
    """'SPLIT[,ENCODER][,VARIANT]' -> (split, encoder, variant); encoder default 'small' (the official config
    files), variant '' (UniMatch V2) or one of `V2_VARIANTS`. E.g. '1464,base,csl' -> ('1464', 'base', 'csl')."""
    parts = [p.strip() for p in arg.split(",") if p.strip()] if arg else []
    variant = parts.pop() if parts and parts[-1] in V2_VARIANTS else ""
    encoder = parts.pop() if parts and parts[-1] in V2_ENCODERS else "small"
    if len(parts) > 1:
        raise ValueError(f"config argument {arg!r}: expected 'SPLIT[,ENCODER][,VARIANT]' with ENCODER one of "
                         f"{list(V2_ENCODERS)} and VARIANT one of {list(V2_VARIANTS)}")
    return (parts[0] if parts else default_split), encoder, variant


def get_v2_recipe(dataset: str, arg: str, method: str) -> ml_collections.ConfigDict:
    """UniMatch V2's recipe on `dataset` for `method` ('unimatch_v2' or 'supervised'), `arg` as
    `parse_v2_argument`: DINOv2 + DPT from the DINOv2 weights (`model.init_from='imagenet'`), AdamW
    (lr 5e-6, head x40, weight decay 0.01 on every parameter), poly with the lr set after each step,
    the dataset's protocol; the EMA teacher picks the best checkpoint. The strong views keep their
    jittered padding as the reference's; the TMP ablation's block scales with the crop (32 px at 321)."""
    split, encoder, variant = parse_v2_argument(arg, {"pascal": "1464", "cityscapes": "1_16", "ade20k": "1_64",
                                                      "coco": "1_512", "camvid": "1_8"}[dataset])
    r = V2_RECIPES[dataset]
    c = get_base_config()
    # the DPT's own fields (csl_jax/models/dpt.py): DeepLabV3+'s (depth, width, ...) do not apply
    c.model = ml_collections.ConfigDict(dict(name="dpt", encoder=encoder, dtype="float32", remat=False,
                                             attention="auto", init_from="imagenet", init_kind="auto", kernels="fast",
                                             **{f: config_dict.placeholder(t) for f, t in DPT_NARROWING.items()}))
    c.data.update(name=dataset, split=split, crop_size=r["crop_size"], block_size_reference_crop=321,
                  keep_jittered_padding=True)
    c.loss.labeled = r["labeled_loss"]
    c.loss.group_size = r["group_size"]
    c.optim.update(name="adamw", lr=5e-6, lr_multi=40.0, weight_decay=0.01, weight_decay_on="all",
                   lr_after_step=True, epochs=r["epochs"])
    c.eval.protocol = r["protocol"]
    if method == "supervised":
        if variant:
            raise ValueError(f"config argument {arg!r}: the supervised baseline has no variant {variant!r}")
        c.batch.labeled = 2 * r["batch"]
        c.data.epoch_samples = r["epoch_samples"]
        return c
    from csl_jax.methods import unimatch_v2

    c.batch.labeled = c.batch.unlabeled = r["batch"]
    if variant == "fixmatch_v2":
        unimatch_v2.configure(c, "fixmatch_v2")
    else:
        unimatch_v2.configure(c, "unimatch_v2", variant)
    return c
