"""PyTorch's legacy 'nearest' downsampling inside the step (`F.interpolate(mode='nearest')`): the label and
confidence maps brought to the feature stride by U2PL's contrastive loss and CSS's contrast and prototypes.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np


@functools.lru_cache(maxsize=None)
def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch legacy 'nearest' source indices: min(floor(i * (in/out)), in - 1) in float32, (n_out,) int32."""
    scale = np.float32(n_in) / np.float32(n_out)
    index = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, n_in - 1).astype(np.int32)


def downsample_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """(B, H, W, ...) -> (B, h, w, ...) with `nearest_indices` on both axes (F.interpolate mode='nearest')."""
    rows = nearest_indices(x.shape[1], int(size[0]))
    cols = nearest_indices(x.shape[2], int(size[1]))
    return x[:, rows][:, :, cols]
