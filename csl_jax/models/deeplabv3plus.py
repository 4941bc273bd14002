"""DeepLabV3+ in the UniMatch layout (also CSL, CCVC), with UniMatch/CSL feature perturbation.

Parameter tree (PyTorch key -> Flax path, numeric indices joined with '_'):
  backbone.*               -> backbone/...            (csl_jax.models.resnet.ResNet, or with
                                                       backbone_arch='xception65'
                                                       csl_jax.models.xception.Xception65)
  head.b{0..3}.{0,1}       -> head/b{i}_{0,1}         (ASPP branches: conv, BN)
  head.b4.gap.{1,2}        -> head/b4/gap_{1,2}       (image pooling: conv, BN)
  head.project.{0,1}       -> head/project_{0,1}
  reduce.{0,1}, fuse.{0,1,3,4}, classifier -> reduce_{0,1}, fuse_{0,1,3,4}, classifier
See docs/models.md §3-5.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from csl_jax.models.layers import BatchNorm, Dropout2d, conv, resize_align_corners, resize_logits
from csl_jax.models.resnet import ResNet
from csl_jax.models.xception import MIDDLE_BLOCKS, Xception65

FP_DROPOUT_RATE = 0.5
#: `backbone_arch` values (`config.model.backbone`): the ResNet of `depth`/`stem`, or Xception-65.
BACKBONES = ("resnet", "xception65")


class ASPPPooling(nn.Module):
    """Image pooling branch: global mean -> 1x1 conv (gap_1) -> BN (gap_2) -> ReLU -> broadcast.

    (B, H, W, Cin) -> (B, H, W, features).
    """

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        y = conv(self.features, 1, name="gap_1", dtype=self.dtype, param_dtype=self.param_dtype)(pooled)
        y = nn.relu(BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name="gap_2")(y, not train))
        # align_corners upsampling of a 1x1 map is a broadcast.
        return jnp.broadcast_to(y, x.shape[:3] + (self.features,))


class ASPP(nn.Module):
    """ASPP: b0 1x1, b1-b3 dilated 3x3, b4 image pooling, concat, 1x1 projection (all conv-BN-ReLU).

    (B, H, W, Cin) -> (B, H, W, features).
    """

    rates: Tuple[int, ...] = (6, 12, 18)
    features: int = 256
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def conv_bn_relu(y, name, kernel_size, dilation=1):
            y = conv(self.features, kernel_size, dilation=dilation, name=f"{name}_0", **kw)(y)
            y = BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name=f"{name}_1")(y, not train)
            return nn.relu(y)

        branches = [conv_bn_relu(x, "b0", 1)]
        branches += [conv_bn_relu(x, f"b{i}", 3, dilation=r) for i, r in enumerate(self.rates, 1)]
        branches.append(ASPPPooling(self.features, bn_axis_name=self.bn_axis_name, name="b4", **kw)(x, train))
        return conv_bn_relu(jnp.concatenate(branches, axis=-1), "project", 1)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (UniMatch layout): ResNet -> ASPP on c4, 48-ch reduce on c1, fuse, classifier.

    `backbone_arch='xception65'` puts UniMatch's Xception-65 in place of the ResNet (c1 = block2's
    pre-activation 256-ch feature at stride 4, c4 = conv5's 2048 ch, no c3); the head is the same.
    Its `width` scales every Xception channel count by width / 64, `blocks` is None (16 middle-flow
    blocks) or (n,) (n of them); depth, stem, multi_grid and maxpool_ceil are ResNet fields (the
    last two must stay False).

    Variants reuse the stages through `encode`, `decoder_features` (= `decoder_concat` then
    `decoder_fuse`) and `classify` (call them from a subclass's `@nn.compact __call__`; e.g. a
    representation head reading the fused features, or a mapping between concat and fuse).
    """

    num_classes: int
    depth: int = 101
    stem: str = "deep"
    output_stride: int = 16
    multi_grid: bool = False
    aspp_rates: Tuple[int, ...] = (6, 12, 18)
    maxpool_ceil: bool = False
    width: int = 64
    blocks: Optional[Tuple[int, ...]] = None
    head_width: int = 256
    reduce_width: int = 48
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None
    remat: bool = False
    backbone_arch: str = "resnet"

    def encode(self, x: jax.Array, train: bool) -> Tuple[jax.Array, Optional[jax.Array], jax.Array]:
        """Backbone: (B, H, W, 3) float32 -> (c1, c3, c4) in the compute dtype (c3 None for Xception)."""
        if self.backbone_arch == "xception65":
            return self._encode_xception(x, train)
        if self.backbone_arch != "resnet":
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone_arch!r}")
        return ResNet(depth=self.depth, stem=self.stem, output_stride=self.output_stride,
                      multi_grid=self.multi_grid, maxpool_ceil=self.maxpool_ceil, width=self.width,
                      blocks=self.blocks, dtype=self.dtype, param_dtype=self.param_dtype,
                      bn_axis_name=self.bn_axis_name, remat=self.remat,
                      name="backbone")(x.astype(self.dtype), train)

    def _encode_xception(self, x: jax.Array, train: bool) -> Tuple[jax.Array, None, jax.Array]:
        """Xception-65: (B, H, W, 3) float32 -> (c1, None, c4) in the compute dtype."""
        if self.multi_grid or self.maxpool_ceil:
            raise ValueError("backbone 'xception65' has no multi_grid or maxpool_ceil (ResNet fields); got "
                             f"multi_grid={self.multi_grid}, maxpool_ceil={self.maxpool_ceil}")
        if self.blocks is not None and len(self.blocks) != 1:
            raise ValueError(f"backbone 'xception65' takes blocks=None (16 middle-flow blocks) or (n,) (n of them), "
                             f"got {self.blocks}")
        middle = MIDDLE_BLOCKS if self.blocks is None else int(self.blocks[0])
        c1, c4 = Xception65(output_stride=self.output_stride, width=self.width, middle_blocks=middle,
                            dtype=self.dtype, param_dtype=self.param_dtype, bn_axis_name=self.bn_axis_name,
                            remat=self.remat, name="backbone")(x.astype(self.dtype), train)
        return c1, None, c4

    def decoder_features(self, c1: jax.Array, c4: jax.Array,
                         train: bool) -> Tuple[jax.Array, jax.Array]:
        """c1 (N, h1, w1, C1), c4 (N, h4, w4, C4) -> (concat, fused).

        concat = [reduce(c1), upsample(ASPP(c4))] (N, h1, w1, reduce_width + head_width);
        fused = fuse(concat) (N, h1, w1, head_width), the classifier input. Compute dtype.
        """
        concat = self.decoder_concat(c1, c4, train)
        return concat, self.decoder_fuse(concat, train)

    def decoder_concat(self, c1: jax.Array, c4: jax.Array, train: bool) -> jax.Array:
        """[reduce(c1), upsample(ASPP(c4))]: (N, h1, w1, reduce_width + head_width), compute dtype."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        high = ASPP(tuple(self.aspp_rates), self.head_width, bn_axis_name=self.bn_axis_name,
                    name="head", **kw)(c4, train)
        high = resize_align_corners(high, c1.shape[1:3])
        low = conv(self.reduce_width, 1, name="reduce_0", **kw)(c1)
        low = nn.relu(BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name="reduce_1")(low, not train))
        return jnp.concatenate([low, high], axis=-1)

    def decoder_fuse(self, concat: jax.Array, train: bool) -> jax.Array:
        """fuse: two 3x3 conv-BN-ReLU, (N, h, w, F) -> (N, h, w, head_width), compute dtype."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = concat
        for i in (0, 3):
            y = conv(self.head_width, 3, name=f"fuse_{i}", **kw)(y)
            y = nn.relu(BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name=f"fuse_{i + 1}")(y, not train))
        return y

    def classify(self, features: jax.Array, size: Sequence[int]) -> jax.Array:
        """1x1 classifier (with bias), then align-corners resize: (N, h, w, F) -> (N, *size, C) float32."""
        logits = conv(self.num_classes, 1, use_bias=True, name="classifier", dtype=self.dtype,
                      param_dtype=self.param_dtype)(features)
        return resize_logits(logits, size)  # float32; bfloat16 matmuls where exact (layers.resize_logits)

    def perturb(self, c1: jax.Array, c4: jax.Array, train: bool,
                sample_ids: Optional[jax.Array]) -> Tuple[jax.Array, jax.Array]:
        """UniMatch FP: ([c1; Dropout2d(c1)], [c4; Dropout2d(c4)]) on the batch axis (2B samples).

        The two masks are independent and drawn per global sample id (see Dropout2d).
        """
        d1 = Dropout2d(FP_DROPOUT_RATE, name="fp_dropout_c1")(c1, not train, sample_ids)
        d4 = Dropout2d(FP_DROPOUT_RATE, name="fp_dropout_c4")(c4, not train, sample_ids)
        return jnp.concatenate([c1, d1], axis=0), jnp.concatenate([c4, d4], axis=0)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, feature_perturb: bool = False,
                 sample_ids: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """Segment a batch.

        Args:
          x: (B, H, W, 3) float32, ImageNet-normalised.
          train: batch statistics in BN (updated only if 'batch_stats' is mutable) and active
            dropout (needs a 'dropout' rng when feature_perturb).
          feature_perturb: also run the decoder on channel-dropped backbone features.
          sample_ids: (B,) int32 global sample ids for the FP dropout masks (default arange(B)).
        Returns:
          (logits, out): logits (B, H, W, num_classes) float32 from the clean features; out is {}
          or, with feature_perturb, {"logits_fp": (B, H, W, num_classes) float32}. Variants add
          "features", "rep" and "aux" (docs/models.md "Model outputs").
        """
        b, h, w, _ = x.shape
        c1, _, c4 = self.encode(x, train)
        if feature_perturb:
            c1, c4 = self.perturb(c1, c4, train, sample_ids)
        _, features = self.decoder_features(c1, c4, train)
        logits = self.classify(features, (h, w))
        if feature_perturb:
            return logits[:b], {"logits_fp": logits[b:]}
        return logits, {}
