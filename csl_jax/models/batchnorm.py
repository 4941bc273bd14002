"""Fused train-mode BatchNorm: one statistics pass, one backward reduction pass, a `jax.custom_vjp`.

`batch_norm_train(x, scale, bias, ...)` -> (y, mean, var) normalises x (..., C) over all axes but
the last with its batch statistics (biased variance), as `layers.BatchNorm` in train mode:

- Forward: shifted one-pass moments. With K = the mean of the middle row of the local batch's first
  image per channel (`data_shift`; no gradient), the sums S1 = sum(x - K) and S2 = sum((x - K)^2) are sibling reductions
  of the same input, accumulated in float32 while x stays in its own dtype (bf16 in training), for
  XLA's multi-output fusion (not checked on CPU). mean = K + S1 / n, M2 = S2 - S1^2 / n. The
  rounding of that difference grows with ((mean - K) / std)^2 (relative var error measured
  ~2e-7 * ((mean - K) / std)^2), and K, a mean of values of the batch, lies within a fraction of a
  std of its mean whatever |mean| / std is.
- SyncBN (`axis_name` inside shard_map): every device's (mean_i, M2_i) gathered by one psum (each
  device fills its row of a (devices, 2C) table), combined on every device as Chan et al.'s
  parallel variance: mean = the mean of the mean_i (equal counts),
  M2 = sum M2_i + n_i sum (mean_i - mean)^2. Each device shifts by its own K, so no shift has to be
  shared, and nothing cancels catastrophically (PyTorch's SyncBatchNorm gathers per-device moments
  the same way). Backward: one psum of (sum dy, sum dy * xhat).
- Residuals: x in its own dtype and the float32 (C,) mean, rstd and scale; no activation-sized
  float32 residual. xhat = (x - mean) * rstd is recomputed on the fly in the backward.
- Backward: one fused reduction (sum dy, sum dy * xhat) and one elementwise pass
  dx = scale * rstd * (dy - sum dy / n - xhat * sum(dy * xhat) / n); d bias = sum dy,
  d scale = sum dy * xhat, both local sums as autodiff gives them (with `check_vma` on and
  replicated params: the psummed sums, again as autodiff gives them).
- The mean and var outputs (for the running statistics) are NOT differentiable: they are returned
  through `stop_gradient`, so their cotangents are always zero and the backward ignores them.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from csl_jax.parallel import varying_axes

Dtype = Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bn(x, scale, bias, epsilon, axis_name, out_dtype):
    y, mean, var, _ = _forward(x, scale, bias, epsilon, axis_name, out_dtype)
    return y, mean, var


def moments(x: jax.Array, axis_name: Optional[str] = None) -> tuple[jax.Array, jax.Array]:
    """(mean, biased var) float32 (C,) of x (..., C) over all axes but the last (and `axis_name`'s devices):
    shifted one-pass sums per device, combined across devices from one gathering psum (module docstring)."""
    axes = tuple(range(x.ndim - 1))
    shift = data_shift(x)
    d = x.astype(jnp.float32) - shift
    s1, s2 = jnp.sum(d, axis=axes), jnp.sum(d * d, axis=axes)
    n = float(np.prod(x.shape[:-1]))
    mean, m2 = shift + s1 / n, jnp.maximum(s2 - s1 * s1 / n, 0.0)
    if axis_name is None:
        return mean, m2 / n
    c, devices = mean.shape[0], jax.lax.axis_size(axis_name)
    # every device's (mean_i, M2_i) in its row of a (devices, 2C) table: one psum (an all_gather whose
    # result shard_map's replication check knows to be the same on every device)
    row = jax.nn.one_hot(jax.lax.axis_index(axis_name), devices, dtype=jnp.float32)[:, None]
    gathered = jax.lax.psum(row * jnp.concatenate([mean, m2])[None], axis_name)
    means, m2s = gathered[:, :c], gathered[:, c:]
    mean = jnp.mean(means, axis=0)  # every device holds n values (static shapes)
    m2 = jnp.sum(m2s, axis=0) + n * jnp.sum(jnp.square(means - mean), axis=0)
    return mean, m2 / (n * devices)


def _forward(x, scale, bias, epsilon, axis_name, out_dtype):
    mean, var = moments(x, axis_name)
    rstd = jax.lax.rsqrt(var + epsilon)
    scale_f = scale.astype(jnp.float32)
    y = (x.astype(jnp.float32) - mean) * (scale_f * rstd) + bias
    return y.astype(out_dtype), mean, var, (x, mean, rstd, scale_f)


def _bn_fwd(x, scale, bias, epsilon, axis_name, out_dtype):
    y, mean, var, res = _forward(x, scale, bias, epsilon, axis_name, out_dtype)
    return (y, mean, var), res


def _bn_bwd(epsilon, axis_name, out_dtype, res, cts):
    del epsilon, out_dtype
    x, mean, rstd, scale = res  # scale, mean, rstd: float32 (C,)
    dy = cts[0]  # cts[1:] (mean, var) are zero: those outputs pass through stop_gradient
    axes = tuple(range(x.ndim - 1))
    dyf = dy.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    sdy = jnp.sum(dyf, axis=axes)
    sdyx = jnp.sum(dyf * xhat, axis=axes)
    count = float(np.prod(x.shape[:-1]))
    g_sdy, g_sdyx = sdy, sdyx
    if axis_name is not None:
        g_sdy, g_sdyx = jax.lax.psum(jnp.stack([sdy, sdyx]), axis_name)  # one all-reduce
        count = count * jax.lax.axis_size(axis_name)
        # With check_vma on, a replicated (invariant) param's cotangent is the psummed one.
        if axis_name in varying_axes(dy) and axis_name not in varying_axes(scale):
            sdy, sdyx = g_sdy, g_sdyx
    dx = (dyf - g_sdy / count - xhat * (g_sdyx / count)) * (scale * rstd)
    return dx.astype(x.dtype), sdyx, sdy


_bn.defvjp(_bn_fwd, _bn_bwd)


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float = 1e-5,
                     axis_name: Optional[str] = None,
                     dtype: Optional[Dtype] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode BN of x (..., C) with batch statistics; returns (y, mean, var).

    scale, bias: (C,) params (any float dtype, cotangents in theirs); y in `dtype` (default x's
    dtype); mean and the biased var are float32 (C,), global over `axis_name` when given, and carry
    no gradient.
    """
    # float32 params inside: the casts' autodiff returns the cotangents in the params' dtypes
    y, mean, var = _bn(x, scale.astype(jnp.float32), bias.astype(jnp.float32), float(epsilon),
                       axis_name, jnp.dtype(dtype or x.dtype))
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


def data_shift(x: jax.Array) -> jax.Array:
    """The mean of one row of the batch per channel, the middle row of the first image (x[0, H // 2] of NHWC;
    x[0] of (N, L, C); x[:1] of (N, C)): float32 (C,), no gradient. Values of the batch away from the
    zero-padded border (a border row's mean can lie several std off): within a fraction of a std of the
    batch mean whatever |mean| / std is, for 1/(N H) of a pass over x (under SyncBN each device takes
    its own: `moments` combines the shifted moments, not the sums)."""
    if x.ndim >= 4:
        row = x[(0, x.shape[1] // 2) + (0,) * (x.ndim - 4)]
    else:
        row = x[0] if x.ndim == 3 else x[:1]
    return jax.lax.stop_gradient(jnp.mean(row.astype(jnp.float32).reshape(-1, x.shape[-1]), axis=0))
