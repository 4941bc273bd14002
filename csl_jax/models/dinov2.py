"""DINOv2 ViT/14, UniMatch V2's encoder (docs/models.md "DINOv2 + DPT").

The network of LiheYoung/UniMatch-V2 `model/backbone/dinov2.py` and `dinov2_layers/` at f6afb4d,
as specified in docs/methods/unimatch_v2.md §1 (no registers, LayerScale, no drop path):

- patch embedding: a 14x14/14 conv with bias, flattened row-major; a class token in front; the
  positional table (class position + a 37 x 37 grid) added, the grid resized to the token grid by
  torch's bicubic with scale factors (h + 0.1) / 37 (`bicubic_matrix`), the identity only when the
  token grid is the stored one (518 x 518);
- blocks: t += ls1 * Attn(norm1(t)); t += ls2 * FFN(norm2(t)); LayerNorm eps 1e-6; attention with a
  qkv bias, [q | k | v] head-major, q scaled by head_dim^-0.5; FFN an MLP (exact erf GELU) or, for
  giant, SwiGLU (`w12` split in halves, silu(x1) * x2, `w3`);
- output: the tokens after each tapped block, through the final `norm`, class token dropped.

Numerics: the token stream, LayerNorms, softmax, GELU and the position table are float32; only the
matmuls and the patch conv run in `dtype` (bf16 when asked). Module names are the official keys
(`blocks.3.attn.qkv.weight` -> `blocks_3/attn/qkv/kernel`, `ls1.gamma` -> `ls1/gamma`); the unused
`mask_token` is not a parameter.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from csl_jax.models.layers import torch_default_init

PATCH_SIZE = 14
#: side of the stored position grid (518 / 14)
POS_GRID = 37
#: DINOv2's `interpolate_offset`: the grid is resized by scale factors (n + 0.1) / 37
INTERPOLATE_OFFSET = 0.1
#: the cubic coefficient of torch's bicubic (Keys' kernel)
CUBIC_A = -0.75
LN_EPS = 1e-6
#: `attention` values: 'einsum' (exact, the CPU default), 'dot_product' (jax.nn.dot_product_attention,
#: cuDNN on GPU), 'auto' (dot_product on GPU, einsum elsewhere)
ATTENTION = ("auto", "einsum", "dot_product")
FFNS = ("mlp", "swiglu")
#: the linear layers' init of the official `init_weights_vit_timm` (overwritten by the pretrained file)
linear_init = nn.initializers.truncated_normal(0.02)


class Encoder(NamedTuple):
    """One DINOv2 size: embed dim D, blocks, heads (head dim 64) and FFN kind (spec §1.1)."""

    embed_dim: int
    depth: int
    num_heads: int
    ffn: str


ENCODERS = {"small": Encoder(384, 12, 6, "mlp"), "base": Encoder(768, 12, 12, "mlp"),
            "large": Encoder(1024, 24, 16, "mlp"), "giant": Encoder(1536, 40, 24, "swiglu")}


def ffn_hidden(embed_dim: int, ffn: str) -> int:
    """Hidden width: 4D (MLP), or (int(4D * 2/3) + 7) // 8 * 8 (SwiGLU: 4096 for D = 1536)."""
    return 4 * embed_dim if ffn == "mlp" else (int(4 * embed_dim * 2 / 3) + 7) // 8 * 8


def _cubic(d: np.ndarray) -> np.ndarray:
    """Keys' cubic kernel K(d) with A = CUBIC_A, for |d| < 2."""
    a, d = CUBIC_A, np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, far)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix of torch's 1-D bicubic resize by scale factor (n_out + 0.1) / n_in.

    `F.interpolate(scale_factor=s, mode='bicubic', align_corners=False, antialias=False)`: output i
    reads x = (i + 0.5) * float32(1 / s) - 0.5 (float32, not clamped), taps floor(x) - 1 .. floor(x) + 2
    clamped to [0, n_in - 1] with weights K(1 + t), K(t), K(1 - t), K(2 - t), t = x - floor(x).
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"interpolation sizes must be >= 1, got n_in={n_in}, n_out={n_out}")
    scale = np.float32(1.0 / ((n_out + INTERPOLATE_OFFSET) / n_in))
    x = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    start = np.floor(x)
    t = (x - start).astype(np.float64)[:, None]
    taps = np.clip(start.astype(np.int64)[:, None] + np.arange(-1, 3), 0, n_in - 1)
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out)[:, None], taps), _cubic(t + np.array([1.0, 0.0, -1.0, -2.0])))
    m = m.astype(np.float32)
    m.flags.writeable = False
    return m


def position_table(pos_embed: jax.Array, h: int, w: int) -> jax.Array:
    """The positions of an h x w token grid: (1, 1 + M*M, D) table -> (1, 1 + h*w, D) float32.

    The class position is kept; the M x M grid is the table itself when h = w = M, else resized by
    `bicubic_matrix` in each direction (rows by h, columns by w), in float32, row-major.
    """
    table = pos_embed.astype(jnp.float32)
    grid = math.isqrt(table.shape[1] - 1)
    if grid * grid != table.shape[1] - 1:
        raise ValueError(f"pos_embed must hold 1 + M*M positions, got {table.shape[1]}")
    if h == w == grid:
        return table
    patch = table[0, 1:].reshape(grid, grid, -1)
    hp = jax.lax.Precision.HIGHEST
    patch = jnp.einsum("yi,ijd->yjd", jnp.asarray(bicubic_matrix(grid, h)), patch, precision=hp)
    patch = jnp.einsum("xj,yjd->yxd", jnp.asarray(bicubic_matrix(grid, w)), patch, precision=hp)
    return jnp.concatenate([table[:, :1], patch.reshape(1, h * w, -1)], axis=1)


def layer_norm(name: str, param_dtype: Any = jnp.float32) -> nn.LayerNorm:
    """LayerNorm(eps 1e-6) in float32 with two-pass statistics, as torch computes them."""
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=jnp.float32, param_dtype=param_dtype,
                        name=name)


def attention_kind(attention: str) -> str:
    """'einsum' or 'dot_product' for an `attention` value of ATTENTION ('auto': dot_product on GPU)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if attention == "auto":
        return "dot_product" if jax.default_backend() == "gpu" else "einsum"
    return attention


class Attention(nn.Module):
    """Multi-head self-attention: (B, N, D) float32 -> (B, N, D) in `dtype`.

    qkv = Linear(D -> 3D, bias), split [q | k | v] each head-major; softmax(q * hd^-0.5 k^T) v
    (float32 logits and softmax); proj = Linear(D -> D, bias).
    """

    num_heads: int
    attention: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, u: jax.Array) -> jax.Array:
        b, n, d = u.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=linear_init)
        head_dim = d // self.num_heads
        qkv = nn.Dense(3 * d, name="qkv", **kw)(u).reshape(b, n, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, head_dim)
        scale = head_dim ** -0.5
        if attention_kind(self.attention) == "dot_product":
            o = jax.nn.dot_product_attention(q, k, v, scale=scale)
        else:
            logits = jnp.einsum("bqhc,bkhc->bhqk", q * jnp.asarray(scale, q.dtype), k,
                                preferred_element_type=jnp.float32)
            o = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
        return nn.Dense(d, name="proj", **kw)(o.reshape(b, n, d))


class FeedForward(nn.Module):
    """MLP (`fc1`, exact GELU, `fc2`) or SwiGLU (`w12`, silu(x1) * x2, `w3`): (B, N, D) -> (B, N, D), `dtype`."""

    ffn: str = "mlp"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, u: jax.Array) -> jax.Array:
        d = u.shape[-1]
        hidden = ffn_hidden(d, self.ffn)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=linear_init)
        if self.ffn == "mlp":
            y = nn.Dense(hidden, name="fc1", **kw)(u).astype(jnp.float32)
            return nn.Dense(d, name="fc2", **kw)(jax.nn.gelu(y, approximate=False).astype(self.dtype))
        x1, x2 = jnp.split(nn.Dense(2 * hidden, name="w12", **kw)(u).astype(jnp.float32), 2, axis=-1)
        return nn.Dense(d, name="w3", **kw)((jax.nn.silu(x1) * x2).astype(self.dtype))


class LayerScale(nn.Module):
    """Per-channel scale `gamma` (D,) (DINOv2's init_values 1.0): (..., D) -> (..., D) float32."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return x.astype(jnp.float32) * gamma.astype(jnp.float32)


class Block(nn.Module):
    """t + ls1 * Attn(norm1(t)), then + ls2 * FFN(norm2(t)): (B, N, D) float32 -> (B, N, D) float32."""

    num_heads: int
    ffn: str = "mlp"
    attention: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = Attention(self.num_heads, self.attention, name="attn", **kw)(layer_norm("norm1", self.param_dtype)(t))
        t = t + LayerScale(self.param_dtype, name="ls1")(y)
        y = FeedForward(self.ffn, name="mlp", **kw)(layer_norm("norm2", self.param_dtype)(t))
        return t + LayerScale(self.param_dtype, name="ls2")(y)


class PatchEmbed(nn.Module):
    """`proj`: a p x p / p conv with bias, 3 -> D: (B, H, W, 3) -> (B, H/p, W/p, D) in `dtype`."""

    embed_dim: int
    patch_size: int = PATCH_SIZE
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        return nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                       param_dtype=self.param_dtype, kernel_init=torch_default_init, name="proj")(x.astype(self.dtype))


class DINOv2(nn.Module):
    """DINOv2 ViT returning the tokens of the tapped blocks (module docstring).

    x (B, H, W, 3) float32, H and W multiples of `patch_size` -> a tuple of len(taps) arrays
    (B, h*w, D) float32 (h = H / 14, w = W / 14, row-major), each through the final `norm`, without
    the class token. The last tap must be the last block. `remat` rematerialises every block.
    The taps are also sown as 'intermediates'/'taps'.
    """

    embed_dim: int
    depth: int
    num_heads: int
    taps: Tuple[int, ...]
    ffn: str = "mlp"
    pos_grid: int = POS_GRID
    patch_size: int = PATCH_SIZE
    attention: str = "auto"
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def check(self) -> None:
        """ValueError for inconsistent fields: heads dividing D, taps increasing and ending at the last block."""
        if self.ffn not in FFNS:
            raise ValueError(f"ffn must be one of {FFNS}, got {self.ffn!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        taps = tuple(self.taps)
        if not taps or list(taps) != sorted(set(taps)) or taps[0] < 0 or taps[-1] != self.depth - 1:
            raise ValueError(f"taps must be increasing block indices ending at the last block ({self.depth - 1}), "
                             f"got {taps}")
        attention_kind(self.attention)

    @nn.compact
    def __call__(self, x: jax.Array) -> Tuple[jax.Array, ...]:
        self.check()
        b, height, width, _ = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"DINOv2 inputs must be multiples of {p} pixels, got {height} x {width}")
        h, w, d = height // p, width // p, self.embed_dim
        t = PatchEmbed(d, p, self.dtype, self.param_dtype, name="patch_embed")(x).reshape(b, h * w, d)
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d), self.param_dtype)
        pos = self.param("pos_embed", nn.initializers.truncated_normal(0.02), (1, 1 + self.pos_grid ** 2, d),
                         self.param_dtype)
        t = jnp.concatenate([jnp.broadcast_to(cls.astype(jnp.float32), (b, 1, d)), t.astype(jnp.float32)], axis=1)
        t = t + position_table(pos, h, w)
        block = nn.remat(Block) if self.remat else Block
        norm = layer_norm("norm", self.param_dtype)
        outputs = []
        for i in range(self.depth):
            t = block(self.num_heads, self.ffn, self.attention, self.dtype, self.param_dtype, name=f"blocks_{i}")(t)
            if i in self.taps:
                outputs.append(norm(t)[:, 1:])
        self.sow("intermediates", "taps", tuple(outputs))
        return tuple(outputs)

