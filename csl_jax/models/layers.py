"""Building blocks with PyTorch semantics: align-corners resize, BatchNorm, Dropout2d, convs.

All tensors are NHWC. See docs/models.md (§6 resizing, §7 BatchNorm, §8 padding).

Three train-time kernels replace plain JAX formulations (docs/models.md "Train-time kernels"): the fused
BatchNorm (csl_jax.models.batchnorm), dilated convs with GEMM weight gradients (csl_jax.models.dilated)
and the bfloat16 logit resize (`resize_logits`). `kernels('reference')` switches all three back for
A/B checks and benchmarks.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from csl_jax.models.batchnorm import batch_norm_train
from csl_jax.models.dilated import DilatedConv

Dtype = Any
#: 'fast': the train-time kernels above; 'reference': the plain JAX formulations they replace
KERNELS = ("fast", "reference")
_active_kernels = ["fast"]


@contextlib.contextmanager
def kernels(name: str) -> Iterator[None]:
    """Within the block, models *traced* use `name`'s kernels ('fast' | 'reference').

    Read at trace time: a jitted function traced before keeps the kernels it was traced with, so trace
    (or build) the step inside the block. Not thread-safe (a process-wide setting, like a benchmark's).
    """
    if name not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {name!r}")
    _active_kernels.append(name)
    try:
        yield
    finally:
        _active_kernels.pop()


def fast_kernels() -> bool:
    """Whether the train-time kernels are on (the default; off inside `kernels('reference')`)."""
    return _active_kernels[-1] == "fast"

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


def weights_exact_in(m: np.ndarray, dtype: Dtype) -> bool:
    """Whether every entry of the float32 matrix `m` is exactly representable in `dtype` (trace-time NumPy)."""
    return bool(np.array_equal(m.astype(jnp.dtype(dtype)).astype(np.float32), m))


def _split_bf16(v: jax.Array, pieces: int) -> list:
    """`pieces` bfloat16 arrays whose float32 sum is v (float32): exactly for 3 pieces (3 x 8 significant bits
    cover float32's 24), to 2^-8 / 2^-16 relative for 1 / 2. A bfloat16 v is its own single piece."""
    if v.dtype == jnp.bfloat16:
        return [v]
    out, rest = [], v
    for i in range(pieces):
        piece = rest.astype(jnp.bfloat16)
        out.append(piece)
        if i + 1 < pieces:
            rest = rest - piece.astype(jnp.float32)
    return out


def _split_dot(m: np.ndarray, v: jax.Array, axis: int, pieces: int) -> jax.Array:
    """m (n_out, n_in) applied along axis 1 or 2 of the NHWC v, bfloat16 operands, float32 result.

    v (float32 or bfloat16) is split into bfloat16 pieces (`_split_bf16`) concatenated along the contracted
    axis, against m tiled as many times: one dot_general whose products are exact when m is exact in
    bfloat16, accumulated in float32 (`preferred_element_type`).
    """
    parts = _split_bf16(v, pieces)
    lhs = jnp.asarray(np.tile(m, (1, len(parts))), jnp.bfloat16)
    rhs = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)
    spec = "oh,bhwc->bowc" if axis == 1 else "pw,bowc->bopc"
    return jnp.einsum(spec, lhs, rhs, preferred_element_type=jnp.float32)


@functools.lru_cache(maxsize=None)
def _bf16_resize(in_h: int, in_w: int, out_h: int, out_w: int, pieces: int):
    """The custom_vjp resize of `resize_logits`' bfloat16 path for these sizes: every dot, forward and
    backward, takes bfloat16 operands (the float32 intermediate and the float32 cotangent split into
    `pieces`) and accumulates in float32."""
    mh, mw = interpolation_matrix(in_h, out_h), interpolation_matrix(in_w, out_w)
    mh_t, mw_t = np.ascontiguousarray(mh.T), np.ascontiguousarray(mw.T)

    @jax.custom_vjp
    def resize(x):
        return _split_dot(mw, _split_dot(mh, x, 1, pieces), 2, pieces)

    def fwd(x):
        return resize(x), None

    def bwd(_, ct):
        grad = _split_dot(mh_t, _split_dot(mw_t, ct.astype(jnp.float32), 2, pieces), 1, pieces)
        return (grad.astype(jnp.bfloat16),)

    resize.defvjp(fwd, bwd)
    return resize


def resize_logits(x: jax.Array, size: Sequence[int], pieces: int = 3) -> jax.Array:
    """`resize_align_corners(x.astype(float32), size)` (float32 out) with bfloat16 matmuls where exact.

    A bfloat16 x whose interpolation weights are exactly representable in bfloat16 (checked at trace time,
    e.g. k/16 for 33 -> 513, k/4 for 129 -> 513; `weights_exact_in`) is resized by dot_generals with
    bfloat16 operands and float32 accumulation, forward and backward (a custom_vjp). The rows pass reads x
    itself; the columns pass reads the float32 intermediate split into `pieces` bfloat16 parts (default 3:
    an exact split, so every product is exact and the result equals the float32 resize up to float32
    accumulation order; the dot costs `pieces` times the FLOPs). Any other case (float32 x, other dtypes,
    inexact weights) is the float32 resize, bit for bit.
    """
    out_h, out_w = int(size[0]), int(size[1])
    _, in_h, in_w, _ = x.shape
    if (not fast_kernels() or x.dtype != jnp.bfloat16 or (in_h, in_w) == (out_h, out_w)
            or not weights_exact_in(interpolation_matrix(in_h, out_h), jnp.bfloat16)
            or not weights_exact_in(interpolation_matrix(in_w, out_w), jnp.bfloat16)):
        return resize_align_corners(x.astype(jnp.float32), size)
    return _bf16_resize(in_h, in_w, out_h, out_w, int(pieces))(x)


class BatchNorm(nn.Module):
    """BatchNorm2d with PyTorch semantics on the last (channel) axis.

    - running stats: new = momentum * old + (1 - momentum) * batch_stat (momentum 0.9 here is
      PyTorch's 0.1); the running variance takes the unbiased batch variance (n / (n - 1)), the
      output is normalised with the biased one;
    - train mode, fused (default, `fused=None` under `kernels('fast')`, or `fused=True`):
      `batchnorm.batch_norm_train`, a custom_vjp with shifted one-pass float32 statistics (each
      device shifts by a value of its batch; SyncBN combines the per-device moments gathered by
      one psum), x saved in its own dtype, one fused backward reduction, one psum per direction;
      two-pass (`fused=False`, or under `kernels('reference')`): the float32 two-pass formula
      differentiated by JAX;
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
    #: train mode: True the fused BN, False the two-pass one, None (default) as `kernels` says (fused)
    fused: Optional[bool] = None

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        """x: (..., C) -> (..., C) in `dtype` (default: x's dtype)."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        if use_running_average:
            return self._normalise(x, ra_mean.value, ra_var.value, scale, bias)
        n_local = int(np.prod(x.shape[:-1]))
        if self.axis_name is None and n_local < 2:
            raise ValueError(
                f"BatchNorm {self.name!r} in train mode needs more than one value per channel, "
                f"got input shape {x.shape} (the ASPP image-pooling BN needs a batch of >= 2)")
        if self.fused if self.fused is not None else fast_kernels():
            y, mean, var = batch_norm_train(x, scale, bias, epsilon=self.epsilon, axis_name=self.axis_name,
                                            dtype=self.dtype)
            count = n_local * (jax.lax.axis_size(self.axis_name) if self.axis_name is not None else 1)
        else:
            mean, var, count = self._two_pass_stats(x)
            y = self._normalise(x, mean, var, scale, bias)
        if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
            unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
            ra_var.value = m * ra_var.value + (1.0 - m) * unbiased
        return y

    def _two_pass_stats(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(mean, biased var, count) of x (..., C) in float32, summed over `axis_name` when given."""
        xf = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        total = jnp.sum(xf, axis=axes)
        count = jnp.float32(np.prod(x.shape[:-1]))
        if self.axis_name is not None:
            total, count = jax.lax.psum((total, count), self.axis_name)
        mean = total / count
        sq = jnp.sum(jnp.square(xf - mean), axis=axes)
        if self.axis_name is not None:
            sq = jax.lax.psum(sq, self.axis_name)
        return mean, sq / count, count

    def _normalise(self, x, mean, var, scale, bias) -> jax.Array:
        """(x - mean) * scale / sqrt(var + eps) + bias in float32, then `dtype` (default x's)."""
        mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
        y = (x.astype(jnp.float32) - mean) * mul + bias.astype(jnp.float32)
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
    A dilated conv (dilation > 1, stride 1, groups 1, no bias) is a `dilated.DilatedConv`: the same
    nn.Conv parameter and forward, its weight gradient k*k GEMMs (docs/models.md, dilated convs).
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"conv {name!r}: only odd kernel sizes are supported, got {kernel_size}")
    p = dilation * (kernel_size - 1) // 2
    conv_cls = nn.Conv
    if dilation > 1 and stride == 1 and feature_group_count == 1 and not use_bias and fast_kernels():
        conv_cls = DilatedConv
    return conv_cls(features, (kernel_size, kernel_size), strides=(stride, stride),
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
