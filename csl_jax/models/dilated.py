"""Dilated stride-1 convolutions whose weight gradient is k*k GEMMs instead of XLA's slow path.

JAX differentiates a stride-1 conv with kernel dilation d w.r.t. its kernel as a convolution of the
input with the output gradient using window_strides = d. XLA-GPU's conv rewriter does not match that
to a cuDNN backward-filter conv, so it runs as a forward cuDNN conv with a map-sized "filter"
(sm80 indexed kernels in the profile; docs/models.md "Dilated convolutions"). Here:

- forward: `lax.conv_general_dilated` with the same arguments as `flax.linen.Conv` (bit-identical);
- input gradient: the conv JAX's own transpose rule emits (reversed kernel, stride 1, rhs dilation
  d), which cuDNN runs as a dilated forward/backward-data conv, so it equals autodiff exactly. It is kept a conv on
  purpose: as k*k GEMMs it would need k*k shifted scatter-adds of activation-sized float32 partial
  sums, the slow calls of the profile are attributed to the weight gradients, and a GEMM dgrad would
  only win by skipping the padding taps;
- weight gradient: for each tap (i, j) one GEMM over only the in-bounds window,
  dW[i, j] = sum_{b, h, w} x[b, h + oy, w + ox, :]^T dy[b, h, w, :] over the output pixels whose input
  pixel (h + oy, w + ox), oy = i d - p, ox = j d - p, lies inside the map; taps that read padding
  only are zeros (no GEMM). float32 accumulation, then cast to the kernel dtype.

`DilatedConv` is the Flax module `layers.conv` returns for dilation > 1 (stride 1, groups 1, no
bias): a `flax.linen.Conv` subclass with the same parameter ('kernel', HWIO, same init and dtype
policy), so checkpoints, converters and module interceptors see an `nn.Conv`.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from csl_jax.parallel import varying_axes

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _padding(kernel_size: int, dilation: int) -> int:
    """PyTorch padding p = dilation * (k - 1) / 2 (same output size at stride 1)."""
    return dilation * (kernel_size - 1) // 2


def _check(x: jax.Array, kernel: jax.Array, dilation: int) -> None:
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"dilated_conv needs NHWC x and HWIO kernel, got shapes {x.shape}, {kernel.shape}")
    k = kernel.shape[0]
    if kernel.shape[1] != k or k % 2 != 1:
        raise ValueError(f"dilated_conv needs a square odd kernel, got {kernel.shape[:2]}")
    if kernel.shape[2] != x.shape[3]:
        raise ValueError(f"kernel input channels {kernel.shape[2]} != x channels {x.shape[3]} (groups must be 1)")
    if x.dtype != kernel.dtype:
        raise ValueError(f"x and kernel must share a dtype, got {x.dtype} and {kernel.dtype}")
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive int, got {dilation!r}")


def conv_forward(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """The plain conv, exactly as `flax.linen.Conv` calls it (and its autodiff is XLA's path).

    x: (B, H, W, Cin); kernel: (k, k, Cin, Cout), both in one dtype. -> (B, H, W, Cout) in that dtype.
    """
    p = _padding(kernel.shape[0], dilation)
    return lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)), lhs_dilation=(1, 1),
                                    rhs_dilation=(dilation, dilation), dimension_numbers=DIMENSION_NUMBERS,
                                    feature_group_count=1, precision=None)


def tap_window(n: int, kernel_size: int, dilation: int, tap: int) -> Optional[Tuple[int, int, int]]:
    """(input start, output start, length) of the in-bounds window of `tap` on an axis of n pixels.

    Output o reads input o + tap * dilation - p; that is inside [0, n) for n - |offset| outputs.
    None when the tap reads padding only (|offset| >= n).
    """
    offset = tap * dilation - _padding(kernel_size, dilation)
    length = n - abs(offset)
    if length <= 0:
        return None
    return max(0, offset), max(0, -offset), length


def weight_grad(x: jax.Array, dy: jax.Array, kernel_size: int, dilation: int,
                dtype=None) -> jax.Array:
    """dW of the stride-1 dilated conv as one GEMM per in-bounds tap.

    x: (B, H, W, Cin); dy: (B, H, W, Cout) (same dtype). Returns (k, k, Cin, Cout) in `dtype`
    (default x's dtype), accumulated in float32 (`preferred_element_type`).
    """
    b, h, w, cin = x.shape
    cout = dy.shape[-1]
    rows = [tap_window(h, kernel_size, dilation, i) for i in range(kernel_size)]
    cols = [tap_window(w, kernel_size, dilation, j) for j in range(kernel_size)]
    zeros = jnp.zeros((cin, cout), jnp.float32)
    taps = []
    for row in rows:
        for col in cols:
            if row is None or col is None:
                taps.append(zeros)
                continue
            (xi, oi, nh), (xj, oj, nw) = row, col
            xs = lax.slice(x, (0, xi, xj, 0), (b, xi + nh, xj + nw, cin))
            gs = lax.slice(dy, (0, oi, oj, 0), (b, oi + nh, oj + nw, cout))
            taps.append(lax.dot_general(xs, gs, (((0, 1, 2), (0, 1, 2)), ((), ())),
                                        preferred_element_type=jnp.float32))
    dw = jnp.stack(taps).reshape(kernel_size, kernel_size, cin, cout)
    return dw.astype(dtype or x.dtype)


def input_grad(dy: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """dx of the stride-1 dilated conv, the conv JAX's transpose rule emits for it (autodiff's dgrad).

    A stride-1 conv of dy with the spatially reversed kernel, in and out features swapped (HWOI),
    the same padding p and rhs dilation. dy: (B, H, W, Cout); kernel: (k, k, Cin, Cout), dy's
    dtype. Returns (B, H, W, Cin) in dy's dtype.
    """
    p = _padding(kernel.shape[0], dilation)
    return lax.conv_general_dilated(dy, lax.rev(kernel, (0, 1)), (1, 1), ((p, p), (p, p)), lhs_dilation=(1, 1),
                                    rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWOI", "NHWC"),
                                    feature_group_count=1, precision=None)


def _sum_to_vma(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """Cotangent of a primal that is invariant over some mapped axes ct varies over: the psum over them
    (what autodiff gives a replicated param under shard_map with check_vma on; a no-op otherwise)."""
    extra = tuple(sorted(varying_axes(ct) - varying_axes(primal)))
    return lax.psum(ct, extra) if extra else ct


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dilated_conv(x, kernel, dilation):
    return conv_forward(x, kernel, dilation)


def _fwd(x, kernel, dilation):
    return conv_forward(x, kernel, dilation), (x, kernel)


def _bwd(dilation, residuals, dy):
    x, kernel = residuals
    dx = input_grad(dy, kernel, dilation)
    dw = weight_grad(x, dy, kernel.shape[0], dilation, kernel.dtype)
    return _sum_to_vma(dx, x), _sum_to_vma(dw, kernel)


_dilated_conv.defvjp(_fwd, _bwd)


def dilated_conv(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """Stride-1 conv with kernel dilation `dilation`, PyTorch padding p = dilation (k - 1) / 2, groups 1.

    x: (B, H, W, Cin); kernel: (k, k, Cin, Cout) HWIO, k odd, same dtype as x.
    Returns (B, H, W, Cout) in x's dtype. Forward bit-identical to `flax.linen.Conv` / lax; input
    gradient identical to autodiff; weight gradient k*k in-bounds GEMMs (float32 accumulation).
    """
    _check(x, kernel, dilation)
    return _dilated_conv(x, kernel, dilation)


class DilatedConv(nn.Conv):
    """`nn.Conv` whose call is `dilated_conv`: square odd kernel, stride 1, padding p = d (k - 1) / 2,
    kernel_dilation d, groups 1, no bias. Same parameter as `nn.Conv`: 'kernel' (k, k, Cin, features)
    in param_dtype from kernel_init; input and kernel are cast to `dtype` for the compute.

    (B, H, W, Cin) -> (B, H, W, features) in `dtype`.
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        k = tuple(self.kernel_size) if not isinstance(self.kernel_size, int) else (self.kernel_size,) * 2
        d = self.kernel_dilation if isinstance(self.kernel_dilation, int) else tuple(self.kernel_dilation)
        d = (d, d) if isinstance(d, int) else d
        p = _padding(k[0], d[0])
        strides = self.strides if not isinstance(self.strides, int) else (self.strides,) * 2
        if (len(k) != 2 or k[0] != k[1] or d[0] != d[1] or tuple(strides) != (1, 1)
                or self.feature_group_count != 1 or self.use_bias or self.input_dilation not in (1, (1, 1))
                or self.mask is not None or tuple(map(tuple, self.padding)) != ((p, p), (p, p))):
            raise ValueError(f"DilatedConv {self.name!r}: needs a square kernel, stride 1, symmetric padding "
                             f"dilation * (k - 1) / 2, groups 1, no bias, no mask; got kernel {k}, dilation {d}, "
                             f"strides {strides}, padding {self.padding}")
        if inputs.ndim != 4:
            raise ValueError(f"DilatedConv {self.name!r} needs NHWC input, got shape {inputs.shape}")
        kernel = self.param("kernel", self.kernel_init, k + (inputs.shape[-1], self.features), self.param_dtype)
        x, kernel, _ = self.promote_dtype(inputs, kernel, None, dtype=self.dtype)
        return dilated_conv(x, kernel, int(d[0]))
