"""ResNet-50/101 backbones (bottleneck v1.5) with deep or torchvision stem, OS 16/8, multi-grid.

Module names follow the PyTorch state-dict keys with every numeric index joined to the name
before it: `layer3.5.conv2.weight` -> `layer3_5/conv2/kernel`, `conv1.0.weight` -> `conv1_0/kernel`.
See docs/models.md §1-2.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from csl_jax.models.layers import BatchNorm, conv, kaiming_fan_out_init, max_pool_3x3_s2

DEPTH_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# torchvision `replace_stride_with_dilation` for [layer2, layer3, layer4].
REPLACE_STRIDE_WITH_DILATION = {16: (False, False, True), 8: (False, True, True)}
MULTI_GRID = (2, 2, 4)
EXPANSION = 4


def resolve_blocks(depth: int, blocks: Optional[Sequence[int]]) -> Tuple[int, ...]:
    """Blocks per layer: `blocks` if given (4 positive ints), else the standard ones for `depth`."""
    if blocks is not None:
        blocks = tuple(int(b) for b in blocks)
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be 4 positive ints, got {blocks}")
        return blocks
    if depth not in DEPTH_BLOCKS:
        raise ValueError(f"depth must be one of {sorted(DEPTH_BLOCKS)}, got {depth}")
    return DEPTH_BLOCKS[depth]


def block_schedule(blocks: Sequence[int], output_stride: int,
                   multi_grid: bool = False) -> Tuple[Tuple[Tuple[int, int], ...], ...]:
    """(stride, dilation) of the 3x3 conv of every block, per layer (torchvision semantics).

    A layer whose stride is replaced by dilation keeps stride 1, doubles the running dilation,
    gives its first block the previous dilation and the other blocks the new one. Multi-grid
    multiplies layer4's dilations by (2, 2, 4). Returns 4 tuples of (stride, dilation).
    """
    if output_stride not in REPLACE_STRIDE_WITH_DILATION:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    replace = (False,) + REPLACE_STRIDE_WITH_DILATION[output_stride]
    dilation = 1
    layers = []
    for li, n in enumerate(blocks):
        stride = 1 if li == 0 else 2
        previous = dilation
        if replace[li]:
            dilation *= stride
            stride = 1
        dils = [previous] + [dilation] * (n - 1)
        if li == 3 and multi_grid:
            if n > len(MULTI_GRID):
                raise ValueError(f"multi_grid needs at most {len(MULTI_GRID)} blocks in layer4, got {n}")
            dils = [d * g for d, g in zip(dils, MULTI_GRID)]
        layers.append(tuple((stride if i == 0 else 1, d) for i, d in enumerate(dils)))
    return tuple(layers)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4) with BN/ReLU; optional `downsample` shortcut.

    (B, H, W, Cin) -> (B, H/stride, W/stride, 4 * width).
    """

    width: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=kaiming_fan_out_init)

        def bn(name):
            return BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name=name)

        y = nn.relu(bn("bn1")(conv(self.width, 1, name="conv1", **kw)(x), not train))
        y = conv(self.width, 3, stride=self.stride, dilation=self.dilation, name="conv2", **kw)(y)
        y = nn.relu(bn("bn2")(y, not train))
        y = bn("bn3")(conv(self.width * EXPANSION, 1, name="conv3", **kw)(y), not train)
        if self.downsample:
            x = conv(self.width * EXPANSION, 1, stride=self.stride, name="downsample_0", **kw)(x)
            x = bn("downsample_1")(x, not train)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """ResNet backbone returning (c1, c3, c4) = outputs of layer1, layer3, layer4.

    stem 'deep': conv1_0 3x3/2 (w) -> BN -> ReLU -> conv1_3 3x3 (w) -> BN -> ReLU -> conv1_6 3x3
    (2w) -> bn1 -> ReLU; stem 'torchvision': conv1 7x7/2 (w) -> bn1 -> ReLU; then max-pool 3x3/2.
    Layer widths are width * (1, 2, 4, 8), outputs 4x that.
    x: (B, H, W, 3) -> c1 (B, H/4, W/4, 4w), c3 (.., 16w), c4 (B, H/OS, W/OS, 32w), in `dtype`.
    """

    depth: int = 101
    stem: str = "deep"
    output_stride: int = 16
    multi_grid: bool = False
    maxpool_ceil: bool = False
    width: int = 64
    blocks: Optional[Tuple[int, ...]] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> Tuple[jax.Array, jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=kaiming_fan_out_init)

        def bn(name):
            return BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name=name)

        w = self.width
        if self.stem == "deep":
            x = nn.relu(bn("conv1_1")(conv(w, 3, stride=2, name="conv1_0", **kw)(x), not train))
            x = nn.relu(bn("conv1_4")(conv(w, 3, name="conv1_3", **kw)(x), not train))
            x = conv(2 * w, 3, name="conv1_6", **kw)(x)
        elif self.stem == "torchvision":
            x = conv(w, 7, stride=2, name="conv1", **kw)(x)
        else:
            raise ValueError(f"stem must be 'deep' or 'torchvision', got {self.stem!r}")
        x = nn.relu(bn("bn1")(x, not train))
        x = max_pool_3x3_s2(x, ceil_mode=self.maxpool_ceil)

        block_cls = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
        schedule = block_schedule(resolve_blocks(self.depth, self.blocks), self.output_stride,
                                  self.multi_grid)
        outputs = []
        for li, layer in enumerate(schedule):
            for bi, (stride, dilation) in enumerate(layer):
                x = block_cls(w * 2 ** li, stride=stride, dilation=dilation, downsample=bi == 0,
                              dtype=self.dtype, param_dtype=self.param_dtype,
                              bn_axis_name=self.bn_axis_name, name=f"layer{li + 1}_{bi}")(x, train)
            outputs.append(x)
        return outputs[0], outputs[2], outputs[3]
