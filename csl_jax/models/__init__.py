"""DeepLabV3+ models (Flax Linen, NHWC) and PyTorch checkpoint conversion. See docs/models.md."""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import ml_collections

from csl_jax.models.deeplabv3plus import ASPP, DeepLabV3Plus
from csl_jax.models.resnet import ResNet

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(model_cfg: ml_collections.ConfigDict, num_classes: int,
                bn_axis_name: Optional[str] = None) -> DeepLabV3Plus:
    """DeepLabV3Plus from a `config.model` ConfigDict (fields as in configs/common.py).

    Missing optional fields take DeepLabV3Plus's defaults. `bn_axis_name` ('data' inside
    shard_map) makes every BatchNorm a SyncBN over that axis. Params are always float32;
    `dtype` ('float32' | 'bfloat16') is the convolution compute dtype.
    """
    dtype_name = model_cfg.get("dtype", "float32")
    if dtype_name not in _DTYPES:
        raise ValueError(f"config.model.dtype must be one of {sorted(_DTYPES)}, got {dtype_name!r}")
    blocks = model_cfg.get("blocks", None)
    defaults = DeepLabV3Plus.__dataclass_fields__
    fields = ("depth", "stem", "output_stride", "multi_grid", "maxpool_ceil", "width",
              "head_width", "reduce_width", "remat")
    kwargs = {f: model_cfg.get(f, defaults[f].default) for f in fields}
    return DeepLabV3Plus(
        num_classes=num_classes,
        aspp_rates=tuple(model_cfg.get("aspp_rates", defaults["aspp_rates"].default)),
        blocks=None if blocks is None else tuple(blocks),
        dtype=_DTYPES[dtype_name],
        bn_axis_name=bn_axis_name,
        **kwargs)


__all__ = ["ASPP", "DeepLabV3Plus", "ResNet", "build_model"]
