"""Model registry: `config.model.name` -> builder (docs/models.md "Model registry").

A builder is `builder(model_cfg, num_classes, bn_axis_name) -> nn.Module`; the module's
`__call__(x, train, ...)` returns `(logits, out)` with logits (B, H, W, num_classes) float32 and
`out` a dict of extra outputs (see DeepLabV3Plus.__call__ for the keys).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from csl_jax.models.deeplabv3plus import DeepLabV3Plus

DEFAULT_MODEL = "deeplabv3plus"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

Builder = Callable[[ml_collections.ConfigDict, int, Optional[str]], nn.Module]


def compute_dtype(model_cfg: ml_collections.ConfigDict):
    """`config.model.dtype` ('float32' | 'bfloat16', default float32) as a jnp dtype."""
    name = model_cfg.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def build_deeplabv3plus(model_cfg: ml_collections.ConfigDict, num_classes: int,
                        bn_axis_name: Optional[str] = None) -> DeepLabV3Plus:
    """DeepLabV3Plus from `config.model` (fields as in configs/common.py); missing fields take its defaults."""
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
    return MODELS[name](model_cfg, num_classes, bn_axis_name)
