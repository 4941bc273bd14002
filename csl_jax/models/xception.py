"""Xception-65, the backbone of UniMatch V1's COCO recipe (`config.model.backbone='xception65'`).

The network of LiheYoung/UniMatch `model/backbone/xception.py` (commit 0324f3d), itself a copy of
YudeWang/deeplabv3plus-pytorch's port of TF DeepLab's Xception-65; the spec is
/work/shared/docs/datasets-coco-ade20k.md §4 and docs/models.md "Xception-65".

- SeparableConv (`activate_first=True`): ReLU -> depthwise 3x3 (stride, dilation, padding =
  dilation) -> BN -> pointwise 1x1 -> BN, no ReLU in between nor at the end; `activate_first=False`
  (conv3-5): depthwise -> BN -> ReLU -> pointwise -> BN -> ReLU. No conv has a bias.
- Block: sepconv1 (in -> mid), sepconv2 (mid -> out), sepconv3 (out -> out, the block's stride),
  mid = out (`grow_first`) or in (the exit block); skip = 1x1 conv (block stride) + BN when the
  width or the stride changes, else the input. The official ReLUs are in place, which is behaviour:
  an identity-skip block (the middle flow) adds relu(x), not x (sepconv1's ReLU rectifies the
  input tensor that is also the skip), so it returns relu(x) + F(x); block2 is built with
  `inplace=False`, so its sepconv2 output (c1, the low-level feature) keeps its negative values.
- BatchNorm momentum 0.0003 (PyTorch convention; Flax 0.9997) in every backbone BN.
- Output stride 16 (strides 2, 2, 2, 2 of conv1, block1, block2, block3; dilation 1 everywhere,
  as UniMatch uses it) or 8 (block3 stride 1; the middle and exit flows dilated 2). UniMatch's
  blocks 16-19 have the dilation of the other middle blocks (its source had [r, 2r, r]).

Module names are the PyTorch keys: `block4.sepconv1.depthwise.weight` ->
`block4/sepconv1/depthwise/kernel` (HWIO (3, 3, 1, 728)), `block20.skipbn.running_var` ->
`batch_stats/.../block20/skipbn/var`. Narrowed test networks: every channel count times
width / 64 (floor) and `middle_blocks` middle-flow blocks (the exit block is then
`block{4 + middle_blocks}`); the full network is width 64, 16 middle blocks.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from csl_jax.models.layers import BatchNorm, conv, kaiming_fan_out_init

#: Flax momentum of every backbone BN: PyTorch's `bn_mom = 0.0003` (xception.py:5).
BN_MOMENTUM = 1.0 - 0.0003
#: UniMatch's stride list [block2, block3, block20] by output stride (xception.py:97-102).
STRIDES = {16: (2, 2, 1), 8: (2, 1, 1)}
MIDDLE_BLOCKS = 16
FULL_WIDTH = 64  # conv2's channels in the full network; `width` scales every channel count by width / 64


def channels(c: int, width: int) -> int:
    """The channel count `c` of the full network scaled to `width` (c * width // 64)."""
    return c * width // FULL_WIDTH


class SeparableConv(nn.Module):
    """Depthwise 3x3 + BN, pointwise 1x1 + BN, ReLUs by `activate_first` (module docstring).

    (B, H, W, Cin) -> (B, H', W', features), H' = floor((H - 1) / stride) + 1, compute dtype.
    """

    features: int
    stride: int = 1
    dilation: int = 1
    activate_first: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=kaiming_fan_out_init)

        def bn(name):
            return BatchNorm(momentum=BN_MOMENTUM, axis_name=self.bn_axis_name, dtype=self.dtype, name=name)

        c_in = x.shape[-1]
        if self.activate_first:
            x = nn.relu(x)
        x = conv(c_in, 3, stride=self.stride, dilation=self.dilation, feature_group_count=c_in,
                 name="depthwise", **kw)(x)
        x = bn("bn1")(x, not train)
        if not self.activate_first:
            x = nn.relu(x)
        x = bn("bn2")(conv(self.features, 1, name="pointwise", **kw)(x), not train)
        return x if self.activate_first else nn.relu(x)


class Block(nn.Module):
    """Three SeparableConvs plus a skip (module docstring), with the official in-place ReLU semantics.

    x (B, H, W, Cin) -> (out (B, H', W', features), hook (B, H, W, features)): hook is sepconv2's output
    (before sepconv3's ReLU), block2's c1; out = sepconv3(...) + skip, where an identity skip is relu(x).
    """

    features: int
    stride: int = 1
    dilation: int = 1
    grow_first: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> Tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_axis_name=self.bn_axis_name)
        c_in = x.shape[-1]
        if c_in != self.features or self.stride != 1:
            skip = conv(self.features, 1, stride=self.stride, name="skip", dtype=self.dtype,
                        param_dtype=self.param_dtype, kernel_init=kaiming_fan_out_init)(x)
            skip = BatchNorm(momentum=BN_MOMENTUM, axis_name=self.bn_axis_name, dtype=self.dtype,
                             name="skipbn")(skip, not train)
        else:
            # sepconv1's in-place ReLU rectifies the input, which is also the skip: relu(x) + F(x).
            x = nn.relu(x)
            skip = x
        mid = self.features if self.grow_first else c_in
        y = SeparableConv(mid, dilation=self.dilation, name="sepconv1", **kw)(x, train)
        hook = SeparableConv(self.features, dilation=self.dilation, name="sepconv2", **kw)(y, train)
        y = SeparableConv(self.features, stride=self.stride, dilation=self.dilation, name="sepconv3",
                          **kw)(hook, train)
        return y + skip, hook


class Xception65(nn.Module):
    """Xception-65 returning (c1, c4): block2's pre-activation sepconv2 output and conv5's output.

    x (B, H, W, 3) -> c1 (B, H1, W1, 256 w/64) at stride 4 (pre-activation: negative values kept),
    c4 (B, H4, W4, 2048 w/64) at `output_stride`, post-ReLU, in `dtype`; each stride-2 step maps
    n -> floor((n - 1) / 2) + 1 (513 -> 257 -> 129 (c1) -> 65 -> 33 (c4) at OS16).
    """

    output_stride: int = 16
    width: int = FULL_WIDTH
    middle_blocks: int = MIDDLE_BLOCKS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> Tuple[jax.Array, jax.Array]:
        if self.output_stride not in STRIDES:
            raise ValueError(f"Xception-65 output_stride must be 8 or 16, got {self.output_stride}")
        if self.width < 2 or self.middle_blocks < 1:
            raise ValueError(f"Xception-65 needs width >= 2 and middle_blocks >= 1, got width={self.width}, "
                             f"middle_blocks={self.middle_blocks}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_axis_name=self.bn_axis_name)
        conv_kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=kaiming_fan_out_init)

        def ch(c):
            return channels(c, self.width)

        def bn(name):
            return BatchNorm(momentum=BN_MOMENTUM, axis_name=self.bn_axis_name, dtype=self.dtype, name=name)

        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        s2, s3, s20 = STRIDES[self.output_stride]
        rate = 16 // self.output_stride
        x = nn.relu(bn("bn1")(conv(ch(32), 3, stride=2, name="conv1", **conv_kw)(x), not train))
        x = nn.relu(bn("bn2")(conv(ch(64), 3, name="conv2", **conv_kw)(x), not train))
        # entry flow
        x, _ = block_cls(ch(128), stride=2, name="block1", **kw)(x, train)
        x, c1 = block_cls(ch(256), stride=s2, name="block2", **kw)(x, train)
        x, _ = block_cls(ch(728), stride=s3, name="block3", **kw)(x, train)
        # middle flow: identity-skip blocks, dilation `rate` in all three sepconvs (blocks 16-19 too)
        for i in range(self.middle_blocks):
            x, _ = block_cls(ch(728), dilation=rate, name=f"block{4 + i}", **kw)(x, train)
        # exit flow
        x, _ = block_cls(ch(1024), stride=s20, dilation=rate, grow_first=False,
                         name=f"block{4 + self.middle_blocks}", **kw)(x, train)
        for name, features in (("conv3", 1536), ("conv4", 1536), ("conv5", 2048)):
            x = SeparableConv(ch(features), dilation=rate, activate_first=False, name=name, **kw)(x, train)
        return c1, x
