"""Fused train-mode BatchNorm: one statistics pass, one backward reduction pass, a `jax.custom_vjp`.

`batch_norm_train(x, scale, bias, shift, ...)` -> (y, mean, var) normalises x (..., C) over all axes
but the last with its batch statistics (biased variance), as `layers.BatchNorm` in train mode:

- Forward: shifted one-pass statistics. With a per-channel shift K (no gradient), the two sums
  S1 = sum(x - K) and S2 = sum((x - K)^2) are reductions of the same input, accumulated in float32
  while x stays in its own dtype (bf16 in training): sibling reductions of one input, for XLA's
  multi-output fusion (the GPU fusion itself is not checked on CPU). mean = K + S1 / n,
  var = max(S2 / n - (S1 / n)^2, 0). Rounding of that difference grows with ((mean - K) / std)^2
  (relative var error ~ 2e-7 * ((mean - K) / std)^2 measured: 1e-5 at 10, 2e-3 at 100), so K must
  lie near the batch mean: `layers.BatchNorm` passes the running mean under `axis_name` (the same
  on every device, no communication) and one value of the batch per channel otherwise (precise
  at any |mean| / std). See docs/models.md, "BatchNorm".
- SyncBN (`axis_name` inside shard_map): one psum of (S1, S2, count) forward, one psum of
  (sum dy, sum dy * xhat) backward.
- Residuals: x in its own dtype and the float32 (C,) mean, rstd and scale; no activation-sized
  float32 residual. xhat = (x - mean) * rstd is recomputed on the fly in the backward.
- Backward: one fused reduction (sum dy, sum dy * xhat) and one elementwise pass
  dx = scale * rstd * (dy - sum dy / n - xhat * sum(dy * xhat) / n); d bias = sum dy,
  d scale = sum dy * xhat, both local sums as autodiff gives them (with `check_vma` on and
  replicated params: the psummed sums, again as autodiff gives them).
- The mean and var outputs (for the running statistics) are NOT differentiable: they are returned
  through `stop_gradient`, so their cotangents are always zero and the backward ignores them.
  The shift gets a zero cotangent (the statistics do not depend on it in exact arithmetic).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from csl_jax.parallel import varying_axes

Dtype = Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _bn(x, scale, bias, shift, epsilon, axis_name, out_dtype):
    y, mean, var, _ = _forward(x, scale, bias, shift, epsilon, axis_name, out_dtype)
    return y, mean, var


def _forward(x, scale, bias, shift, epsilon, axis_name, out_dtype):
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    d = xf - shift
    s1 = jnp.sum(d, axis=axes)
    s2 = jnp.sum(d * d, axis=axes)
    count = jnp.float32(np.prod(x.shape[:-1]))
    if axis_name is not None:  # one all-reduce of (S1, S2, count), packed in one array
        c = s1.shape[0]
        packed = jax.lax.psum(jnp.concatenate([s1, s2, count[None]]), axis_name)
        s1, s2, count = packed[:c], packed[c:2 * c], packed[2 * c]
    m1 = s1 / count
    mean = shift + m1
    var = jnp.maximum(s2 / count - m1 * m1, 0.0)
    rstd = jax.lax.rsqrt(var + epsilon)
    scale_f = scale.astype(jnp.float32)
    y = (xf - mean) * (scale_f * rstd) + bias
    return y.astype(out_dtype), mean, var, (x, mean, rstd, scale_f)


def _bn_fwd(x, scale, bias, shift, epsilon, axis_name, out_dtype):
    y, mean, var, res = _forward(x, scale, bias, shift, epsilon, axis_name, out_dtype)
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
    return dx.astype(x.dtype), sdyx, sdy, jnp.zeros_like(mean)


_bn.defvjp(_bn_fwd, _bn_bwd)


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, shift: jax.Array, *,
                     epsilon: float = 1e-5, axis_name: Optional[str] = None,
                     dtype: Optional[Dtype] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode BN of x (..., C) with batch statistics; returns (y, mean, var).

    scale, bias: (C,) params (any float dtype, cotangents in theirs); shift: (C,) float32 shift K of
    the one-pass sums (no gradient); y in `dtype` (default x's dtype); mean and the biased var are
    float32 (C,), global over `axis_name` when given, and carry no gradient.
    """
    shift = jax.lax.stop_gradient(jnp.asarray(shift, jnp.float32))
    # float32 params inside: the casts' autodiff returns the cotangents in the params' dtypes
    y, mean, var = _bn(x, scale.astype(jnp.float32), bias.astype(jnp.float32), shift, float(epsilon),
                       axis_name, jnp.dtype(dtype or x.dtype))
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


def data_shift(x: jax.Array) -> jax.Array:
    """One value of the batch per channel (the first position), float32, no gradient.

    A shift within a few standard deviations of the batch mean whatever |mean| / std is; use only
    without `axis_name` (each device would pick a different value).
    """
    return jax.lax.stop_gradient(x[(0,) * (x.ndim - 1)].astype(jnp.float32))
