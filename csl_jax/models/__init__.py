"""Segmentation models (Flax Linen, NHWC), their registry and PyTorch checkpoint conversion. See docs/models.md."""
from __future__ import annotations

from csl_jax.models.deeplabv3plus import ASPP, DeepLabV3Plus
from csl_jax.models.registry import MODELS, build_model, register_model
from csl_jax.models.resnet import ResNet

from csl_jax.models import ccvc  # noqa: E402,F401  (registers 'ccvc')
from csl_jax.models import u2pl  # noqa: E402,F401  (registers 'u2pl')
from csl_jax.models import css  # noqa: E402,F401  (registers 'css')
from csl_jax.models import cpcl  # noqa: E402,F401  (registers 'cpcl')
from csl_jax.models import dpt  # noqa: E402,F401  (registers 'dpt', converters 'dinov2' and 'unimatch_v2')

__all__ = ["ASPP", "DeepLabV3Plus", "MODELS", "ResNet", "build_model", "register_model"]
