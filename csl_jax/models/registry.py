"""Model registry: `config.model.name` -> builder (docs/models.md "Model registry").

A builder is `builder(model_cfg, num_classes, bn_axis_name) -> nn.Module`; the module's
`__call__(x, train, ...)` returns `(logits, out)` with logits (B, H, W, num_classes) float32 and
`out` a dict of extra outputs (see DeepLabV3Plus.__call__ for the keys).

The default model, DeepLabV3Plus, is registered here, and so are the converters of its checkpoint
layouts (csl_jax.models.converters): ImageNet ResNets ('deep_backbone', 'torchvision') and trained
UniMatch ('unimatch') and CSL ('csl') models, and with the Xception-65 backbone
(`config.model.backbone='xception65'`) UniMatch's ImageNet file ('xception') and trained UniMatch
models ('unimatch_xception'). Each variant registers its own in its module.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from csl_jax.models.converters import register_converter, unchanged
from csl_jax.models.deeplabv3plus import BACKBONES, DeepLabV3Plus

DEFAULT_MODEL = "deeplabv3plus"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
#: `config.model` fields added after runs were saved, with the value that rebuilds such a run's model
#: (a config.json without them resumes and evaluates as before: csl_jax.workdir.later_defaults); runs saved
#: before the train-time kernels ran the plain JAX formulations ('reference'); the DPT's narrowing fields
#: (configs/common.py DPT_NARROWING) unset: the encoder's values.
LATER_FIELDS = {"backbone": "resnet", "kernels": "reference",
                **{f: None for f in ("embed_dim", "depth", "num_heads", "ffn", "pos_grid", "patch_size", "features",
                                     "taps", "out_channels")}}

Builder = Callable[[ml_collections.ConfigDict, int, Optional[str]], nn.Module]


def compute_dtype(model_cfg: ml_collections.ConfigDict):
    """`config.model.dtype` ('float32' | 'bfloat16', default float32) as a jnp dtype."""
    name = model_cfg.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def backbone_arch(model_cfg: ml_collections.ConfigDict) -> str:
    """`config.model.backbone` ('resnet' when absent, as in configs saved before the field existed)."""
    name = model_cfg.get("backbone", LATER_FIELDS["backbone"])
    if name not in BACKBONES:
        raise ValueError(f"config.model.backbone must be one of {list(BACKBONES)}, got {name!r}")
    return name


def build_deeplabv3plus(model_cfg: ml_collections.ConfigDict, num_classes: int,
                        bn_axis_name: Optional[str] = None) -> DeepLabV3Plus:
    """DeepLabV3Plus from `config.model` (fields as in configs/common.py); missing fields take its defaults.

    `model.backbone` ('resnet' | 'xception65') is the module's `backbone_arch`.
    """
    blocks = model_cfg.get("blocks", None)
    defaults = DeepLabV3Plus.__dataclass_fields__
    fields = ("depth", "stem", "output_stride", "multi_grid", "maxpool_ceil", "width",
              "head_width", "reduce_width", "remat")
    kwargs = {f: model_cfg.get(f, defaults[f].default) for f in fields}
    return DeepLabV3Plus(
        num_classes=num_classes,
        aspp_rates=tuple(model_cfg.get("aspp_rates", defaults["aspp_rates"].default)),
        blocks=None if blocks is None else tuple(blocks),
        dtype=compute_dtype(model_cfg),
        bn_axis_name=bn_axis_name,
        backbone_arch=backbone_arch(model_cfg),
        **kwargs)


MODELS: Dict[str, Builder] = {DEFAULT_MODEL: build_deeplabv3plus}


def register_model(name: str, builder: Builder) -> Builder:
    """Add `builder` under `name` (ValueError if the name is taken); returns the builder."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = builder
    return builder


def build_model(model_cfg: ml_collections.ConfigDict, num_classes: int,
                bn_axis_name: Optional[str] = None) -> nn.Module:
    """The model named by `config.model.name` (default 'deeplabv3plus'), built by its registered builder.

    `bn_axis_name` ('data' inside shard_map) makes every BatchNorm a SyncBN over that axis. Params
    are always float32; `config.model.dtype` ('float32' | 'bfloat16') is the compute dtype.
    """
    name = model_cfg.get("name", DEFAULT_MODEL)
    if name not in MODELS:
        raise ValueError(f"unknown config.model.name {name!r}; registered models: {sorted(MODELS)}")
    model = MODELS[name](model_cfg, num_classes, bn_axis_name)
    arch = backbone_arch(model_cfg)
    if arch != LATER_FIELDS["backbone"] and not _uses_backbone(model, arch):
        raise ValueError(f"config.model.backbone={arch!r}: model {name!r} does not read it (it builds its own "
                         "ResNet); use model.backbone='resnet' or a model built on DeepLabV3Plus")
    return model


def _uses_backbone(module: Any, arch: str) -> bool:
    """Whether `module`, or a module among its fields (two-branch networks), is built with `backbone_arch=arch`."""
    if getattr(module, "backbone_arch", None) == arch:
        return True
    fields = getattr(module, "__dataclass_fields__", {})
    return any(isinstance(getattr(module, f, None), nn.Module) and _uses_backbone(getattr(module, f), arch)
               for f in fields if f not in ("parent", "name"))


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts of DeepLabV3Plus (detect and unwrap read the state dict selected by
# csl_jax.models.convert.select_state_dict; convert is imported inside the builds, see converters.py)
# ---------------------------------------------------------------------------------------------
def is_csl_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """A CSL Lightning model: `model.backbone.*` keys (and `model.decoder.*`)."""
    return any(k.startswith("model.backbone.") for k in state_dict)


def csl_state_dict(state_dict: Mapping[str, Any]) -> tuple[Dict[str, Any], list]:
    """The `model.*` entries without that prefix and `decoder.` (other Lightning state is ignored)."""
    ignored = sorted(k for k in state_dict if not k.startswith("model."))
    sd = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    return {(k[len("decoder."):] if k.startswith("decoder.") else k): v for k, v in sd.items()}, ignored


def is_unimatch_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """A UniMatch DeepLabV3Plus: `backbone.*` keys (and `head.*`, `reduce.*`, `fuse.*`, `classifier.*`)."""
    return any(k.startswith("backbone.") for k in state_dict)


def is_deep_backbone(state_dict: Mapping[str, Any]) -> bool:
    """An ImageNet deep-stem ResNet (UniMatch's resnet101.pth): bare keys, `conv1.0.weight`."""
    return "conv1.0.weight" in state_dict


def is_torchvision_backbone(state_dict: Mapping[str, Any]) -> bool:
    """A torchvision ResNet: bare keys, `conv1.weight`."""
    return "conv1.weight" in state_dict


def is_unimatch_xception_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """A UniMatch DeepLabV3Plus with the Xception-65 backbone: `backbone.block1.sepconv1.depthwise.weight`."""
    return "backbone.block1.sepconv1.depthwise.weight" in state_dict


def is_xception_backbone(state_dict: Mapping[str, Any]) -> bool:
    """UniMatch's ImageNet Xception-65 (pretrained/xception.pth): bare keys, `block1.sepconv1.depthwise.weight`."""
    return "block1.sepconv1.depthwise.weight" in state_dict


#: What UniMatch drops from its ImageNet Xception file before loading it (xception.py:203), besides
#: `num_batches_tracked` (which every conversion drops): keys containing one of these.
XCEPTION_FILTERED = ("itr", "tmp", "track")


def xception_backbone_state_dict(state_dict: Mapping[str, Any]) -> tuple[Dict[str, Any], list]:
    """Bare Xception keys under `backbone.`; keys UniMatch filters out (`XCEPTION_FILTERED`) are ignored."""
    def dropped(k):
        return any(s in k for s in XCEPTION_FILTERED) and not k.endswith("num_batches_tracked")

    ignored = sorted(k for k in state_dict if dropped(k))
    return {f"backbone.{k}": v for k, v in state_dict.items() if not dropped(k)}, ignored


def backbone_state_dict(state_dict: Mapping[str, Any]) -> tuple[Dict[str, Any], list]:
    """Bare ResNet keys under `backbone.`; the ImageNet classifier `fc.*` is ignored."""
    ignored = sorted(k for k in state_dict if k.startswith("fc."))
    return {f"backbone.{k}": v for k, v in state_dict.items() if not k.startswith("fc.")}, ignored


def _from_deeplabv3plus(checkpoint: Mapping[str, Any], **model_kwargs):
    from csl_jax.models import convert

    return convert.from_unimatch(checkpoint, **model_kwargs)


def _from_backbone(kind: str) -> Callable:
    def build(checkpoint: Mapping[str, Any], **model_kwargs):
        from csl_jax.models import convert

        return convert.from_backbone(checkpoint, kind, **model_kwargs)

    return build


register_converter("csl", layout="Lightning `state_dict` with `model.backbone.*` / `model.decoder.*` keys",
                   detect=is_csl_state_dict, unwrap=csl_state_dict, build=_from_deeplabv3plus)
register_converter("unimatch", layout="`backbone.*` keys (UniMatch: under `model`, `module.` prefixes)",
                   detect=is_unimatch_state_dict, unwrap=unchanged, build=_from_deeplabv3plus)
register_converter("unimatch_xception", layout="`backbone.block1.sepconv1.depthwise.weight` ... (UniMatch "
                   "Xception-65 DeepLabV3+: under `model`, `module.` prefixes)",
                   detect=is_unimatch_xception_state_dict, unwrap=unchanged, build=_from_deeplabv3plus)
register_converter("xception", layout="bare Xception-65 keys, `block1.sepconv1.depthwise.weight` (UniMatch's "
                   "ImageNet xception.pth)",
                   detect=is_xception_backbone, unwrap=xception_backbone_state_dict,
                   build=_from_backbone("xception"))
register_converter("deep_backbone", layout="bare deep-stem ResNet keys, `conv1.0.weight` (maybe `fc.*`)",
                   detect=is_deep_backbone, unwrap=backbone_state_dict, build=_from_backbone("deep_backbone"))
register_converter("torchvision", layout="bare torchvision ResNet keys, `conv1.weight` (maybe `fc.*`)",
                   detect=is_torchvision_backbone, unwrap=backbone_state_dict, build=_from_backbone("torchvision"))
