"""Building blocks with PyTorch semantics: align-corners resize, BatchNorm, Dropout2d, convs.

All tensors are NHWC. See docs/models.md (§6 resizing, §7 BatchNorm, §8 padding).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# PyTorch's default conv init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torchvision / UniMatch ResNet init: kaiming_normal(mode='fan_out', nonlinearity='relu').
kaiming_fan_out_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@functools.lru_cache(maxsize=None)
def interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix of 1-D bilinear align_corners=True interpolation.

    Output index i reads source coordinate i * (n_in - 1) / (n_out - 1) (0 when n_out == 1),
    split between its two neighbouring input samples.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"interpolation sizes must be >= 1, got n_in={n_in}, n_out={n_out}")
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = np.arange(n_out, dtype=np.float64) * scale
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    m = m.astype(np.float32)
    m.flags.writeable = False
    return m


def resize_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Bilinear resize with align_corners=True (PyTorch `F.interpolate` semantics).

    Args:
      x: (B, H, W, C) array of any float dtype.
      size: (out_h, out_w).
    Returns:
      (B, out_h, out_w, C) array in x's dtype. Works for up- and down-sampling.
    """
    out_h, out_w = int(size[0]), int(size[1])
    _, in_h, in_w, _ = x.shape
    if (in_h, in_w) == (out_h, out_w):
        return x
    mh = jnp.asarray(interpolation_matrix(in_h, out_h), dtype=x.dtype)
    mw = jnp.asarray(interpolation_matrix(in_w, out_w), dtype=x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", mh, x)
    return jnp.einsum("pw,bowc->bopc", mw, x)


class BatchNorm(nn.Module):
    """BatchNorm2d with PyTorch semantics on the last (channel) axis.

    - running stats: new = momentum * old + (1 - momentum) * batch_stat (momentum 0.9 here is
      PyTorch's 0.1); the running variance takes the unbiased batch variance (n / (n - 1)), the
      output is normalised with the biased one;
    - two-pass statistics computed in float32 whatever the input dtype;
    - `axis_name`: statistics are summed over that mapped axis (SyncBN inside shard_map), with n
      the total count over batch, spatial dims and devices.

    Params: 'scale', 'bias' (C,) float32. batch_stats: 'mean', 'var' (C,) float32.
    Running stats are updated only in train mode, outside init, and only when the caller marks
    'batch_stats' mutable.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: Optional[str] = None
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        """x: (..., C) -> (..., C) in `dtype` (default: x's dtype)."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            n_local = int(np.prod(x.shape[:-1]))
            if self.axis_name is None and n_local < 2:
                raise ValueError(
                    f"BatchNorm {self.name!r} in train mode needs more than one value per channel, "
                    f"got input shape {x.shape} (the ASPP image-pooling BN needs a batch of >= 2)")
            total = jnp.sum(xf, axis=axes)
            count = jnp.float32(n_local)
            if self.axis_name is not None:
                total, count = jax.lax.psum((total, count), self.axis_name)
            mean = total / count
            sq = jnp.sum(jnp.square(xf - mean), axis=axes)
            if self.axis_name is not None:
                sq = jax.lax.psum(sq, self.axis_name)
            var = sq / count
            if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
                unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
                ra_var.value = m * ra_var.value + (1.0 - m) * unbiased
        mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
        y = (xf - mean) * mul + bias.astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


class Dropout2d(nn.Module):
    """Channel dropout (PyTorch Dropout2d): zeroes whole channels per sample, scales kept by 1/(1-rate).

    The mask of sample i comes from `fold_in(make_rng('dropout'), sample_ids[i])`, so it depends
    only on the global sample id, not on how a batch is split over devices.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool,
                 sample_ids: Optional[jax.Array] = None) -> jax.Array:
        """x: (B, H, W, C); sample_ids: (B,) int32 global ids (default arange(B)). Same shape/dtype out."""
        if deterministic or self.rate == 0.0:
            return x
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"Dropout2d rate must be in [0, 1), got {self.rate}")
        b, c = x.shape[0], x.shape[-1]
        if sample_ids is None:
            sample_ids = jnp.arange(b, dtype=jnp.int32)
        if sample_ids.shape != (b,):
            raise ValueError(f"sample_ids must have shape ({b},), got {sample_ids.shape}")
        key = self.make_rng("dropout")
        keep_prob = 1.0 - self.rate
        keep = jax.vmap(
            lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), keep_prob, (c,)))(sample_ids)
        scaled = x * jnp.asarray(1.0 / keep_prob, x.dtype)
        return jnp.where(keep[:, None, None, :], scaled, jnp.zeros((), x.dtype))


def conv(features: int, kernel_size: int, *, stride: int = 1, dilation: int = 1,
         use_bias: bool = False, name: str, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32,
         kernel_init: Any = torch_default_init, feature_group_count: int = 1) -> nn.Conv:
    """A square NHWC conv with PyTorch padding p = dilation * (kernel_size - 1) / 2 (never 'SAME').

    Kernel (k, k, in / feature_group_count, features) HWIO, the transpose of PyTorch's OIHW weight
    (`feature_group_count` = PyTorch's `groups`; = in = features for a depthwise conv).
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"conv {name!r}: only odd kernel sizes are supported, got {kernel_size}")
    p = dilation * (kernel_size - 1) // 2
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                   padding=((p, p), (p, p)), kernel_dilation=(dilation, dilation),
                   feature_group_count=feature_group_count, use_bias=use_bias, dtype=dtype,
                   param_dtype=param_dtype, kernel_init=kernel_init, bias_init=nn.initializers.zeros,
                   name=name)


def max_pool_3x3_s2(x: jax.Array, ceil_mode: bool = False) -> jax.Array:
    """PyTorch MaxPool2d(3, stride=2, padding=1[, ceil_mode]) on (B, H, W, C), -inf padding.

    Floor mode maps n -> floor((n-1)/2)+1; ceil mode pads (1, 1 + (n-1) mod 2) and maps
    n -> ceil((n-1)/2)+1.
    """
    def pads(n):
        return (1, 1 + (n - 1) % 2) if ceil_mode else (1, 1)

    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=(pads(x.shape[1]), pads(x.shape[2])))
