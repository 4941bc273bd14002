"""UniMatch V2's segmenter: DINOv2 encoder + DPT head (`config.model.name='dpt'`, docs/models.md "DINOv2 + DPT").

LiheYoung/UniMatch-V2 `model/semseg/dpt.py` and `model/util/blocks.py` at f6afb4d, as specified in
docs/methods/unimatch_v2.md §2 (`use_bn=False`: no BatchNorm, no batch_stats):

- each tapped token map (B, h*w, D) -> (B, h, w, D) -> `projects_k` (1x1, bias) -> `resize_layers_k`:
  ConvTranspose 4x4/4 (k=0) and 2x2/2 (k=1) with bias, identity (k=2), 3x3/2 conv with bias (k=3);
- `scratch`: `layer{k}_rn` 3x3 convs without bias to `features`; fusion p4 = refinenet4(l4, size l3),
  p3 = refinenet3(p4, l3, size l2), p2 = refinenet2(p3, l2, size l1), p1 = refinenet1(p2, l1) at 2x;
  a fusion block adds RCU1(skip), applies RCU2, resizes (bilinear, align_corners=True) and
  `out_conv` (1x1, bias); RCU(x) = conv2(relu(conv1(relu(x)))) + x with 3x3 convs with bias;
  `output_conv_0` 3x3 -> ReLU -> `output_conv_2` 1x1 to the classes; logits resized to the input.

`refinenet4.resConfUnit1` (built but never called officially) and the encoder's `mask_token` are
not parameters here; the converters report them as ignored. Parameter tree: {'backbone': DINOv2
(csl_jax.models.dinov2), 'head': {'projects_{0..3}', 'resize_layers_{0,1,3}', 'scratch': ...}}.

Checkpoint kinds (registered here, placed in csl_jax.models.convert.DETECTION_ORDER before 'unimatch'):
'dinov2' (an official DINOv2 `*_pretrain.pth`: bare encoder keys) and 'unimatch_v2' (a trained
UniMatch V2 model: {'model_ema', 'model', ...} with `module.backbone.*` / `module.head.*` keys).
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from csl_jax.models.converters import register_converter
from csl_jax.models.dinov2 import ENCODERS, PATCH_SIZE, POS_GRID, DINOv2
from csl_jax.models.layers import conv, resize_align_corners, torch_default_init
from csl_jax.models.registry import compute_dtype, register_model

DEFAULT_ENCODER = "base"
#: per encoder: the tapped blocks (`dpt.py:123-128`), DPT `features` and `out_channels` (`unimatch_v2.py:54-59`)
HEADS = {"small": ((2, 5, 8, 11), 64, (48, 96, 192, 384)), "base": ((2, 5, 8, 11), 128, (96, 192, 384, 768)),
         "large": ((4, 11, 17, 23), 256, (256, 512, 1024, 1024)), "giant": ((9, 19, 29, 39), 384, (1536,) * 4)}
#: `config.model` fields that change the encoder (a model with any of them off its encoder's value
#: takes no DINOv2 file), and the head's; all default to `model.encoder`'s values
ENCODER_FIELDS = ("embed_dim", "depth", "num_heads", "ffn", "pos_grid", "patch_size")
HEAD_FIELDS = ("taps", "features", "out_channels")
#: DeepLabV3+ fields of configs/common.py that a 'dpt' model config must not carry (`depth` would be
#: read as the ViT's)
DEEPLAB_FIELDS = ("stem", "output_stride", "multi_grid", "aspp_rates", "maxpool_ceil", "width", "blocks",
                  "head_width", "reduce_width")
#: the official modules that exist but never run: the converters drop their keys
UNUSED = ("backbone.mask_token", "head.scratch.refinenet4.resConfUnit1.")


def dpt_fields(encoder: str, **overrides) -> Dict[str, Any]:
    """The DPT fields of `encoder` (small | base | large | giant, spec §1.1 and §2), with `overrides`
    (ENCODER_FIELDS and HEAD_FIELDS, e.g. a tiny test model) replacing them."""
    if encoder not in ENCODERS:
        raise ValueError(f"DINOv2 encoder must be one of {list(ENCODERS)}, got {encoder!r}")
    unknown = sorted(set(overrides) - set(ENCODER_FIELDS + HEAD_FIELDS))
    if unknown:
        raise ValueError(f"unknown DPT fields {unknown}; valid: {list(ENCODER_FIELDS + HEAD_FIELDS)}")
    taps, features, out_channels = HEADS[encoder]
    fields = dict(ENCODERS[encoder]._asdict(), pos_grid=POS_GRID, patch_size=PATCH_SIZE, taps=taps,
                  features=features, out_channels=out_channels)
    fields.update(overrides)
    return {k: tuple(v) if k in ("taps", "out_channels") else v for k, v in fields.items()}


def conv_transpose(features: int, factor: int, *, name: str, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32) -> nn.ConvTranspose:
    """PyTorch `ConvTranspose2d(c, features, factor, stride=factor, padding=0)` with bias, NHWC.

    (B, h, w, c) -> (B, factor*h, factor*w, features): each input pixel writes its own block. The
    kernel (k, k, features, c) is the generic OIHW -> HWIO transpose of torch's (in, out, k, k)
    weight, read with `transpose_kernel=True` (spec §13 trap 3); init U(+-1/sqrt(features k^2)) as torch.
    """
    return nn.ConvTranspose(features, (factor, factor), strides=(factor, factor), padding="VALID",
                            transpose_kernel=True, dtype=dtype, param_dtype=param_dtype,
                            kernel_init=torch_default_init, name=name)


class ResidualConvUnit(nn.Module):
    """conv2(relu(conv1(relu(x)))) + x, 3x3 convs with bias: (B, h, w, f) -> same, `dtype`."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        f = x.shape[-1]
        y = conv(f, 3, name="conv1", **kw)(nn.relu(x))
        return conv(f, 3, name="conv2", **kw)(nn.relu(y)) + x


class FeatureFusionBlock(nn.Module):
    """(x [+ resConfUnit1(skip)]) -> resConfUnit2 -> bilinear align_corners resize to `size` (default
    2x) -> `out_conv` 1x1 with bias: (B, h, w, f) -> (B, *size, f), `dtype`."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skip: Optional[jax.Array] = None,
                 size: Optional[Sequence[int]] = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if skip is not None:
            x = x + ResidualConvUnit(name="resConfUnit1", **kw)(skip)
        x = ResidualConvUnit(name="resConfUnit2", **kw)(x)
        x = resize_align_corners(x, size if size is not None else (2 * x.shape[1], 2 * x.shape[2]))
        return conv(x.shape[-1], 1, use_bias=True, name="out_conv", **kw)(x)


class Scratch(nn.Module):
    """`layer{k}_rn`, the four fusion blocks and `output_conv`: the resized maps l1..l4 (strides 14/4,
    14/2, 14, 28) -> logits (B, 2 h1, 2 w1, num_classes) in `dtype`; p4..p1 sown as 'intermediates'."""

    num_classes: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, layers: Sequence[jax.Array]) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        l1, l2, l3, l4 = (conv(self.features, 3, name=f"layer{k}_rn", **kw)(x) for k, x in enumerate(layers, 1))
        p4 = FeatureFusionBlock(name="refinenet4", **kw)(l4, size=l3.shape[1:3])
        p3 = FeatureFusionBlock(name="refinenet3", **kw)(p4, l3, size=l2.shape[1:3])
        p2 = FeatureFusionBlock(name="refinenet2", **kw)(p3, l2, size=l1.shape[1:3])
        p1 = FeatureFusionBlock(name="refinenet1", **kw)(p2, l1)
        for name, p in (("p4", p4), ("p3", p3), ("p2", p2), ("p1", p1)):
            self.sow("intermediates", name, p)
        y = nn.relu(conv(self.features, 3, use_bias=True, name="output_conv_0", **kw)(p1))
        return conv(self.num_classes, 1, use_bias=True, name="output_conv_2", **kw)(y)


class DPTHead(nn.Module):
    """Four (B, h, w, D) maps -> logits (B, 8h, 8w, num_classes) float32 (module docstring)."""

    num_classes: int
    features: int
    out_channels: Tuple[int, ...]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, maps: Sequence[jax.Array]) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        layers = []
        for k, (x, c) in enumerate(zip(maps, self.out_channels)):
            x = conv(c, 1, use_bias=True, name=f"projects_{k}", **kw)(x)
            if k < 2:
                x = conv_transpose(c, 4 // (k + 1), name=f"resize_layers_{k}", **kw)(x)
            elif k == 3:
                x = conv(c, 3, stride=2, use_bias=True, name="resize_layers_3", **kw)(x)
            layers.append(x)
        return Scratch(self.num_classes, self.features, name="scratch", **kw)(layers).astype(jnp.float32)


class DPT(nn.Module):
    """UniMatch V2's DPT: DINOv2 `backbone` + DPT `head`; the default fields are the official base model.

    `feature_scale` (B, D) multiplies the four tapped token maps (Complementary Dropout masks,
    computed by the method, spec §3). `attention` and `remat` are DINOv2's (csl_jax.models.dinov2).
    """

    num_classes: int
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn: str = "mlp"
    taps: Tuple[int, ...] = (2, 5, 8, 11)
    pos_grid: int = POS_GRID
    patch_size: int = PATCH_SIZE
    features: int = 128
    out_channels: Tuple[int, ...] = (96, 192, 384, 768)
    attention: str = "auto"
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, feature_scale: Optional[jax.Array] = None,
                 feature_perturb: bool = False,
                 sample_ids: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """Segment a batch.

        Args:
          x: (B, H, W, 3) float32, ImageNet-normalised, H and W multiples of 14.
          train: not read (no BatchNorm, no dropout: train and eval passes are the same).
          feature_scale: None or (B, D) float, multiplying every token of each tapped map.
          feature_perturb: must be False (UniMatch V1's FP stream does not exist here).
          sample_ids: not read.
        Returns:
          (logits (B, H, W, num_classes) float32, {}). The tapped maps and p4..p1 are sown as
          'intermediates' (apply(..., mutable=['intermediates'])).
        """
        del train, sample_ids
        if feature_perturb:
            raise ValueError("the DPT model has no feature-perturbation stream (feature_perturb=True); UniMatch V2 "
                             "perturbs the tapped features with feature_scale")
        if len(self.taps) != 4 or len(self.out_channels) != 4:
            raise ValueError(f"the DPT head reads 4 taps into 4 widths, got taps={self.taps}, "
                             f"out_channels={self.out_channels}")
        b, height, width, _ = x.shape
        taps = DINOv2(self.embed_dim, self.depth, self.num_heads, tuple(self.taps), self.ffn, self.pos_grid,
                      self.patch_size, self.attention, self.remat, self.dtype, self.param_dtype, name="backbone")(x)
        if feature_scale is not None:
            if feature_scale.shape != (b, self.embed_dim):
                raise ValueError(f"feature_scale must be (B, D) = {(b, self.embed_dim)}, got {feature_scale.shape}")
            taps = [t * feature_scale[:, None, :].astype(jnp.float32) for t in taps]
        h, w = height // self.patch_size, width // self.patch_size
        maps = [t.reshape(b, h, w, self.embed_dim) for t in taps]
        logits = DPTHead(self.num_classes, self.features, tuple(self.out_channels), self.dtype, self.param_dtype,
                         name="head")(maps)
        return resize_align_corners(logits, (height, width)), {}


def narrowed_fields(model_cfg: ml_collections.ConfigDict) -> Dict[str, Any]:
    """The ENCODER_FIELDS of `config.model` set off `model.encoder`'s values ({} for an official encoder)."""
    official = dpt_fields(model_cfg.get("encoder", DEFAULT_ENCODER))
    return {f: model_cfg[f] for f in ENCODER_FIELDS
            if model_cfg.get(f) is not None and model_cfg[f] != official[f]}


def build_dpt(model_cfg: ml_collections.ConfigDict, num_classes: int, bn_axis_name: Optional[str] = None) -> DPT:
    """The DPT of `config.model` (registry name 'dpt'): `encoder` (small | base | large | giant,
    default base) with the ENCODER_FIELDS / HEAD_FIELDS that are set (not None) replacing its values,
    `dtype`, `remat`, `attention`. `bn_axis_name` is not read (no BatchNorm). Refuses DEEPLAB_FIELDS."""
    del bn_axis_name
    foreign = [f for f in DEEPLAB_FIELDS if f in model_cfg]
    if foreign:
        raise ValueError(f"config.model.name='dpt' takes encoder, {', '.join(ENCODER_FIELDS + HEAD_FIELDS)}, dtype, "
                         f"remat, attention; {foreign} are DeepLabV3+ fields (a 'dpt' config's model section holds "
                         "only its own fields: configs/common.py's depth=101 would be read as the ViT depth)")
    overrides = {f: model_cfg[f] for f in ENCODER_FIELDS + HEAD_FIELDS if model_cfg.get(f) is not None}
    return DPT(num_classes=num_classes, dtype=compute_dtype(model_cfg), remat=bool(model_cfg.get("remat", False)),
               attention=model_cfg.get("attention", "auto"),
               **dpt_fields(model_cfg.get("encoder", DEFAULT_ENCODER), **overrides))


# ---------------------------------------------------------------------------------------------
# Checkpoints: official DINOv2 files ('dinov2') and trained UniMatch V2 models ('unimatch_v2')
# ---------------------------------------------------------------------------------------------
#: top-level entries of a UniMatch V2 checkpoint holding a network (`unimatch_v2.py:265-274`)
CHECKPOINT_KEYS = ("model_ema", "model")


def is_dinov2_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """An official DINOv2 file: bare encoder keys, `blocks.0.attn.qkv.weight` and `pos_embed`."""
    return "blocks.0.attn.qkv.weight" in state_dict and "pos_embed" in state_dict


def dinov2_state_dict(state_dict: Mapping[str, Any]) -> Tuple[Dict[str, Any], list]:
    """The encoder keys under `backbone.`; `mask_token` ignored; ValueError for a register-token file."""
    if "register_tokens" in state_dict:
        raise ValueError("this DINOv2 file has register tokens (a dinov2_vit*14_reg4 model, trained with position "
                         "offset 0.0): UniMatch V2's encoder has none; use dinov2_vit{s,b,l,g}14_pretrain.pth")
    ignored = sorted(k for k in state_dict if f"backbone.{k}".startswith(UNUSED))
    return {f"backbone.{k}": v for k, v in state_dict.items() if k not in ignored}, ignored


def _v2_network(checkpoint: Mapping[str, Any], network: str) -> Tuple[Dict[str, Any], list]:
    """(one network's state dict, `module.` removed; the other top-level entries) of a UniMatch V2 file."""
    from csl_jax.models import convert  # here, not at import: see csl_jax.models.converters

    if network not in ("teacher", "student"):
        raise ValueError(f"network must be 'teacher' (model_ema) or 'student' (model), got {network!r}")
    sd, ignored = checkpoint, []
    if any(isinstance(checkpoint.get(k), Mapping) for k in CHECKPOINT_KEYS):
        key = "model_ema" if network == "teacher" and isinstance(checkpoint.get("model_ema"), Mapping) else "model"
        sd, ignored = checkpoint[key], sorted(k for k in checkpoint if k != key)
    return convert.select_state_dict(sd), ignored


def is_unimatch_v2_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """A UniMatch V2 file ({'model_ema', 'model', ...} or a flat state dict): `backbone.blocks.0.attn.qkv.weight`."""
    return "backbone.blocks.0.attn.qkv.weight" in _v2_network(checkpoint, "teacher")[0]


def unimatch_v2_state_dict(checkpoint: Mapping[str, Any], network: str = "teacher") -> Tuple[Dict[str, Any], list]:
    """One network of a UniMatch V2 checkpoint: 'teacher' (`model_ema`, what V2 reports) or 'student'
    (`model`). Returns ({key: tensor} without `module.` and the UNUSED keys, the ignored entries: the
    other top-level entries and the UNUSED keys)."""
    sd, ignored = _v2_network(checkpoint, network)
    unused = sorted(k for k in sd if k.startswith(UNUSED))
    return {k: v for k, v in sd.items() if k not in unused}, ignored + unused


def checkpoint_fields(state_dict: Mapping[str, Any], encoder: Optional[str] = None, **given) -> Dict[str, Any]:
    """The DPT fields of a converted state dict (`backbone.*` [+ `head.*`] keys) and the class count.

    Shapes give D, depth, FFN, position grid and patch size (and with a head, `features`,
    `out_channels`, `num_classes`). Heads and taps cannot be read: they come from `encoder`, by
    default the official encoder of that D, depth and FFN, or from `given` (e.g. a tiny model's
    num_heads and taps), which replaces any field.
    """
    def shape(key):
        if key not in state_dict:
            raise ValueError(f"the checkpoint has no {key!r}")
        return tuple(state_dict[key].shape)

    blocks = {int(m[1]) for k in state_dict if (m := re.match(r"backbone\.blocks\.(\d+)\.", k))}
    read = dict(embed_dim=shape("backbone.cls_token")[-1], depth=len(blocks),
                ffn="swiglu" if "backbone.blocks.0.mlp.w12.weight" in state_dict else "mlp",
                pos_grid=math.isqrt(shape("backbone.pos_embed")[1] - 1),
                patch_size=shape("backbone.patch_embed.proj.weight")[-1])
    if any(k.startswith("head.") for k in state_dict):
        read.update(features=shape("head.scratch.layer1_rn.weight")[0],
                    out_channels=tuple(shape(f"head.projects.{k}.weight")[0] for k in range(4)),
                    num_classes=shape("head.scratch.output_conv.2.weight")[0])
    official = [n for n, e in ENCODERS.items() if (e.embed_dim, e.depth, e.ffn) == (read["embed_dim"],
                                                                                    read["depth"], read["ffn"])]
    if encoder is not None and encoder not in official:
        raise ValueError(f"encoder {encoder!r} does not fit the checkpoint (D {read['embed_dim']}, depth "
                         f"{read['depth']}, {read['ffn']}): {dpt_fields(encoder)}")
    encoder = encoder or (official[0] if official else None)
    fields = {**(dpt_fields(encoder) if encoder else {}), **read, **given}
    missing = [f for f in ENCODER_FIELDS + HEAD_FIELDS if f not in fields]
    if missing:
        raise ValueError(f"D {read['embed_dim']}, depth {read['depth']} is not an official DINOv2 encoder "
                         f"({list(ENCODERS)}) and {missing} cannot be read from a checkpoint: pass them")
    return fields


def _convert(state_dict: Mapping[str, Any], fields: Dict[str, Any], num_classes: Optional[int],
             backbone_only: bool, model_kwargs: Dict[str, Any]) -> Tuple[DPT, Dict[str, Any]]:
    """(DPT of `fields`, its {'params'}, or {'params': {'backbone'}} when `backbone_only`) from `state_dict`."""
    from csl_jax.models import convert  # here, not at import: see csl_jax.models.converters

    read = fields.pop("num_classes", None)
    if read is not None and num_classes is not None and read != num_classes:
        raise ValueError(f"the checkpoint has {read} classes, not num_classes={num_classes} "
                         f"(the converter CLI: --num-classes {read})")
    model = DPT(num_classes=read or num_classes or 21, **fields, **model_kwargs)
    size = model.patch_size
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
    if backbone_only:
        abstract = {"params": {"backbone": abstract["params"]["backbone"]}}
    variables, _ = convert.merge_variables(abstract, convert.convert_state_dict(state_dict),
                                           allow_missing_outside_backbone=False)
    return model, variables


def from_dinov2(checkpoint: Mapping[str, Any], num_classes: Optional[int] = None, *, encoder: Optional[str] = None,
                depth=None, width=None, blocks=None, **model_kwargs) -> Tuple[DPT, Dict[str, Any]]:
    """(DPT, {'params': {'backbone'}}) from an official DINOv2 file: what the converter CLI writes.

    The encoder is `encoder` or the official one of the file's D and depth (heads and taps come from
    its name); a non-official (test) encoder needs num_heads, taps, features and out_channels in
    `model_kwargs`, which also take dtype, attention, remat. `depth`, `width`, `blocks` are the
    CLI's DeepLabV3+ arguments, not read. Every encoder tensor must be present and of its shape.
    """
    from csl_jax.models import convert  # here, not at import: see csl_jax.models.converters

    del depth, width, blocks
    sd, _, _ = convert.unwrap_state_dict(checkpoint, "dinov2")
    given = {k: model_kwargs.pop(k) for k in ENCODER_FIELDS + HEAD_FIELDS if k in model_kwargs}
    return _convert(sd, checkpoint_fields(sd, encoder, **given), num_classes, True, model_kwargs)


def from_unimatch_v2(checkpoint: Mapping[str, Any], num_classes: Optional[int] = None, *,
                     encoder: Optional[str] = None, network: str = "teacher", depth=None, width=None, blocks=None,
                     **model_kwargs) -> Tuple[DPT, Dict[str, Any]]:
    """(DPT, {'params'}) of one network of a UniMatch V2 checkpoint ('teacher' = `model_ema`, or 'student').

    Classes and head widths are read from the head; the encoder as in `from_dinov2`. `num_classes`,
    when given, must agree with the checkpoint. Every variable must be present.
    """
    del depth, width, blocks
    sd, _ = unimatch_v2_state_dict(checkpoint, network)
    given = {k: model_kwargs.pop(k) for k in ENCODER_FIELDS + HEAD_FIELDS if k in model_kwargs}
    return _convert(sd, checkpoint_fields(sd, encoder, **given), num_classes, False, model_kwargs)


def encoder_error(state_dict: Mapping[str, Any], encoder: str) -> Optional[str]:
    """What keeps an unwrapped 'dinov2' state dict from being `encoder`'s file (None when it is): its
    size first (one line), then every missing, unknown or misshapen tensor."""
    official = dpt_fields(encoder)
    try:
        read = checkpoint_fields(state_dict, encoder)
        off = {f: read[f] for f in ENCODER_FIELDS if read[f] != official[f]}
        if off:
            return f"it has {off}, the {encoder} encoder {({f: official[f] for f in off})}"
        _convert(state_dict, official, None, True, {})
    except ValueError as error:
        return str(error)
    return None


register_model("dpt", build_dpt)
register_converter("unimatch_v2", layout="{'model_ema', 'model', ...} or a flat state dict with "
                   "`backbone.blocks.0.attn.qkv.weight` (UniMatch V2 DINOv2 + DPT, `module.` prefixes)",
                   detect=is_unimatch_v2_checkpoint, unwrap=unimatch_v2_state_dict, build=from_unimatch_v2, raw=True)
register_converter("dinov2", layout="bare DINOv2 keys, `blocks.0.attn.qkv.weight` and `pos_embed` (the official "
                   "dinov2_vit*14_pretrain.pth)", detect=is_dinov2_state_dict, unwrap=dinov2_state_dict,
                   build=from_dinov2)
