"""Checks of a config's settings before anything is written or compiled.

    check(config)   raises ValueError('config.KEY=value: what is valid') on the first bad setting

main.py calls it on the resolved config (exit 2 with that one line); the trainer and the
evaluation modes may call it again. Keys a config does not have are skipped: methods and
datasets without them (e.g. no `batch.unlabeled`) are checked on what they have.
"""

from __future__ import annotations

import ml_collections

from data_prep import splits

_MISSING = object()
#: Splits an evaluation can run on (`test` where the dataset has one prepared).
EVAL_SPLITS = ("val", "test")


def _get(config: ml_collections.ConfigDict, key: str):
    """The value at dotted `key` ('optim.lr'), or _MISSING."""
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _require(config: ml_collections.ConfigDict, key: str, ok, valid: str) -> None:
    """Raises ValueError naming `config.KEY=value` and `valid` unless `ok(value)` (or the key is absent)."""
    value = _get(config, key)
    if value is _MISSING:
        return
    if not (is_number(value) and ok(value)):
        raise ValueError(f"config.{key}={value!r}: must be {valid}")


def is_number(value) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int_tuple(config: ml_collections.ConfigDict, key: str, allow_none: bool = False) -> None:
    """`config.KEY` is a tuple of positive ints (or None when `allow_none`)."""
    value = _get(config, key)
    if value is _MISSING or (allow_none and value is None):
        return
    if not (isinstance(value, (tuple, list)) and value and all(_is_int(v) and v > 0 for v in value)):
        raise ValueError(f"config.{key}={value!r}: must be a tuple of positive ints, e.g. --config.{key}='(6, 12, 18)'")


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError with one line `config.KEY=value: must be ...` for the first invalid setting.

    Schedule, logging, checkpoint and stop steps; batch sizes and accumulation; loss groups; crop
    size and epoch samples; the split (shipped families); optimiser name and learning rate; model
    dtype and int tuples; evaluation protocol, interval and the syntax of `eval.evaluations`
    (PREDICT[@SPLIT][:PROTOCOL]; the method's predict names are checked when it is built). The
    method's own options are `csl_jax.methods.check_config`'s.
    """
    _require(config, "optim.total_steps", lambda v: _is_int(v) and v >= 0,
             "an int >= 0 (0 = optim.epochs x iterations per epoch)")
    if _get(config, "optim.total_steps") in (0, _MISSING):
        _require(config, "optim.epochs", lambda v: v > 0, "> 0 when optim.total_steps=0 (or set optim.total_steps)")
    _require(config, "optim.lr", lambda v: v > 0, "> 0")
    _check_optimizer(config)
    for key in ("log_every_steps", "checkpoint_every_steps"):
        _require(config, key, lambda v: _is_int(v) and v > 0, "an int > 0")
    _require(config, "keep_checkpoints", lambda v: _is_int(v) and v >= 1, "an int >= 1")
    _require(config, "stop_after_steps", lambda v: _is_int(v) and v >= 0, "an int >= 0 (0 = run to the end)")
    _require(config, "eval.every_steps", lambda v: _is_int(v) and v >= 0, "an int >= 0 (0 = once per epoch)")
    _require(config, "eval.batch_size", lambda v: _is_int(v) and v >= 0, "an int >= 0")
    _require(config, "eval.max_images", lambda v: _is_int(v) and v >= 0, "an int >= 0 (0 = the whole split)")
    batch = _get(config, "batch")
    if isinstance(batch, ml_collections.ConfigDict):
        for name in batch:
            if name == "accum_steps":
                _require(config, "batch.accum_steps", lambda v: _is_int(v) and v >= 1, "an int >= 1")
            else:
                _require(config, f"batch.{name}", lambda v: _is_int(v) and v > 0, "an int > 0 (a global batch size)")
    _require(config, "loss.group_size", lambda v: _is_int(v) and v >= 1, "an int >= 1 (images per loss group)")
    _require(config, "data.crop_size", lambda v: _is_int(v) and v > 0, "an int > 0 (pixels)")
    _require(config, "data.epoch_samples", lambda v: _is_int(v) and v >= 0,
             "an int >= 0 (samples per epoch of an epoch_of='fixed' stream; 0 = its list as it is)")
    _check_split(config)
    _check_model(config)
    _check_eval(config)


def _check_optimizer(config: ml_collections.ConfigDict) -> None:
    """optim.name is a known optimiser."""
    from csl_jax.optim import OPTIMIZERS

    name = _get(config, "optim.name")
    if name is not _MISSING and name not in OPTIMIZERS:
        raise ValueError(f"config.optim.name={name!r}: must be one of {list(OPTIMIZERS)}")


def _check_split(config: ml_collections.ConfigDict) -> None:
    """`data.split` is a shipped split of the dataset's family (data_prep/splits); the synthetic and
    custom datasets define theirs when prepared and are checked when read, and with `data.labeled_list`
    (the user's own split of prepared data) the split is only a name."""
    name, split = _get(config, "data.name"), _get(config, "data.split")
    if split is _MISSING or name not in splits.FAMILIES or config.data.get("labeled_list"):
        return
    family = config.data.get("family") or name
    valid = splits.shipped_splits(family)
    if split not in valid:
        raise ValueError(f"config.data.split={split!r}: must be a {family} split: {', '.join(valid)}")


def _check_model(config: ml_collections.ConfigDict) -> None:
    """model.dtype is a known compute dtype, model.backbone a known backbone; aspp_rates and blocks are
    tuples of positive ints; with model.name='dpt', data.crop_size is a multiple of the patch size (14)
    and so are the images the main evaluation protocol feeds it ('whole' needs eval.pad_to_multiple)."""
    from csl_jax.models.deeplabv3plus import BACKBONES
    from csl_jax.models.dinov2 import PATCH_SIZE
    from csl_jax.models.layers import KERNELS
    from csl_jax.models.registry import DTYPES

    dtype = _get(config, "model.dtype")
    if dtype is not _MISSING and dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={dtype!r}: must be one of {sorted(DTYPES)}")
    kernels = _get(config, "model.kernels")
    if kernels not in (_MISSING,) + KERNELS:
        raise ValueError(f"config.model.kernels={kernels!r}: must be one of {list(KERNELS)} (docs/models.md "
                         "'Train-time kernels')")
    backbone = _get(config, "model.backbone")
    if backbone is not _MISSING and backbone not in BACKBONES:
        raise ValueError(f"config.model.backbone={backbone!r}: must be one of {list(BACKBONES)}")
    _check_int_tuple(config, "model.aspp_rates")
    _check_int_tuple(config, "model.blocks", allow_none=True)
    crop, patch = _get(config, "data.crop_size"), _get(config, "model.patch_size")
    patch = PATCH_SIZE if patch in (_MISSING, None) else patch
    if _get(config, "model.name") != "dpt":
        return
    if _is_int(crop) and crop % patch:
        raise ValueError(f"config.data.crop_size={crop}: must be a multiple of {patch} for model.name='dpt' "
                         f"(DINOv2 patches), e.g. {crop // patch * patch} or {(crop // patch + 1) * patch}")
    protocol, pad = _get(config, "eval.protocol"), _get(config, "eval.pad_to_multiple")
    if protocol == "whole" and (not _is_int(pad) or pad % patch or pad == 0):
        raise ValueError(f"config.eval.protocol='whole' runs every image at its own size, which model.name='dpt' "
                         f"takes only in multiples of {patch}: use 'whole_resize' (UniMatch V2's) or set "
                         f"config.eval.pad_to_multiple to a multiple of {patch}")
    multiple = _get(config, "eval.resize_multiple")
    if protocol == "whole_resize" and _is_int(multiple) and multiple % patch:
        raise ValueError(f"config.eval.resize_multiple={multiple}: must be a multiple of {patch} for model.name='dpt'")


def check_evaluation(entry: str, protocol: str, where: str) -> None:
    """Raises ValueError starting with `where` unless `entry` is PREDICT[@SPLIT][:PROTOCOL] with a split of
    EVAL_SPLITS and a registered protocol (default `protocol`)."""
    from csl_jax.evaluation.loop import parse_evaluation
    from csl_jax.evaluation.protocols import PROTOCOLS

    head, _, _ = entry.strip().partition(":")
    if not head.partition("@")[0]:
        raise ValueError(f"{where}: entry {entry.strip()!r} names no predict function; expected "
                         "PREDICT[@SPLIT][:PROTOCOL], e.g. 'teacher' or 'model@test:sliding'")
    evaluation = parse_evaluation(entry, protocol)
    if evaluation.split not in EVAL_SPLITS:
        raise ValueError(f"{where}: entry {entry.strip()!r} names split {evaluation.split!r}; "
                         f"valid: {list(EVAL_SPLITS)}")
    if evaluation.protocol not in PROTOCOLS:
        raise ValueError(f"{where}: entry {entry.strip()!r} names protocol {evaluation.protocol!r}; "
                         f"valid: {sorted(PROTOCOLS)}")


def _check_eval(config: ml_collections.ConfigDict) -> None:
    """eval.resize_multiple is a positive int; eval.protocol is registered; every eval.evaluations entry
    is a valid `check_evaluation` entry."""
    from csl_jax.evaluation.protocols import PROTOCOLS

    _require(config, "eval.resize_multiple", lambda v: _is_int(v) and v > 0,
             "an int > 0 (whole_resize runs each image at the nearest multiple of it; 14 = the ViT patch)")
    protocol = _get(config, "eval.protocol")
    if protocol is _MISSING:
        return
    if protocol not in PROTOCOLS:
        raise ValueError(f"config.eval.protocol={protocol!r}: must be one of {sorted(PROTOCOLS)}")
    spec = _get(config, "eval.evaluations")
    if spec is _MISSING or spec == "":
        return
    where = f"config.eval.evaluations={spec!r}"
    if not isinstance(spec, str) or not spec.strip(", "):
        raise ValueError(f"{where}: must be comma-separated PREDICT[@SPLIT][:PROTOCOL] entries, e.g. "
                         "'teacher,student:sliding', or '' for every predict function of the method")
    for entry in spec.split(","):
        if entry.strip():
            check_evaluation(entry, protocol, where)
