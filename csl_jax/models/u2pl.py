"""U2PL's DeepLabV3+ (docs/methods/u2pl.md "Networks", official `u2pl/models/{base,decoder,model_helper}.py`).

Differs from the UniMatch layout (deeplabv3plus.py): the ASPP has no projection (its 5 x 256
channels go straight into a 3x3 head conv with Dropout2d(0.1)), the low-level path is a 1x1 conv
with bias to 256 channels, and the classifier and the representation head each have two 3x3
convs (with bias) and two Dropout2d(0.1) at stride 4. Cityscapes adds an auxiliary classifier on
layer3 (`aux=True`).

Parameter tree (PyTorch key -> Flax path, numeric indices joined with '_', `encoder` -> `backbone`):
  encoder.*                           -> backbone/...           (csl_jax.models.resnet.ResNet)
  decoder.low_conv.{0,1}              -> decoder/low_conv_{0,1}
  decoder.aspp.conv1.{1,2}            -> decoder/aspp/conv1_{1,2}   (image pooling: conv, BN)
  decoder.aspp.conv{2..5}.{0,1}       -> decoder/aspp/conv{i}_{0,1} (1x1, dilated 3x3 x3)
  decoder.head.{0,1}                  -> decoder/head_{0,1}
  decoder.classifier.{0,1,4,5,8}      -> decoder/classifier_{0,1,4,5,8}
  decoder.representation.{0,1,4,5,8}  -> decoder/representation_{0,1,4,5,8}
  auxor.aux.{0,1,4}                   -> auxor/aux_{0,1,4}
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from csl_jax.models.converters import register_converter
from csl_jax.models.layers import BatchNorm, Dropout2d, conv, resize_align_corners
from csl_jax.models.registry import compute_dtype, register_model
from csl_jax.models.resnet import ResNet

DROPOUT_RATE = 0.1


class _Parts(nn.Module):
    """Shared helpers: conv -> BN -> ReLU (-> Dropout2d) blocks named like the PyTorch Sequential."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None
    dropout_rate: float = DROPOUT_RATE

    def cbr(self, x, features, kernel, name, index, train, *, use_bias, dilation=1, dropout=False, sample_ids=None):
        """conv `{name}_{index}` -> BN `{name}_{index+1}` -> ReLU [-> Dropout2d(dropout_rate), masks keyed by
        `sample_ids` (default arange(B))]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = conv(features, kernel, dilation=dilation, use_bias=use_bias, name=f"{name}_{index}", **kw)(x)
        y = nn.relu(BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name=f"{name}_{index + 1}")(y, not train))
        if dropout:
            y = Dropout2d(self.dropout_rate, name=f"{name}_{index + 3}_dropout")(y, not train, sample_ids)
        return y


class U2PLASPP(_Parts):
    """ASPP without projection: [pool, 1x1, 3x3 d1, 3x3 d2, 3x3 d3] concatenated, (B,h,w,Cin) -> (B,h,w,5F)."""

    rates: Tuple[int, ...] = (12, 24, 36)
    features: int = 256

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        pool = self.cbr(pooled, self.features, 1, "conv1", 1, train, use_bias=False)
        branches = [jnp.broadcast_to(pool, x.shape[:3] + (self.features,)),
                    self.cbr(x, self.features, 1, "conv2", 0, train, use_bias=False)]
        for i, rate in enumerate(self.rates):
            branches.append(self.cbr(x, self.features, 3, f"conv{i + 3}", 0, train, use_bias=False, dilation=rate))
        return jnp.concatenate(branches, axis=-1)


class U2PLDecoder(_Parts):
    """`dec_deeplabv3_plus`: c1, c4 -> (pred (B, h1, w1, C), rep (B, h1, w1, rep_dim)) at stride 4.

    `with_rep=False` skips the representation head (inference); its params exist after init.
    """

    num_classes: int = 21
    rates: Tuple[int, ...] = (12, 24, 36)
    features: int = 256
    low_features: int = 256
    rep_dim: int = 256

    @nn.compact
    def __call__(self, c1, c4, train: bool, sample_ids, with_rep: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        parts = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_axis_name=self.bn_axis_name)
        aspp = U2PLASPP(rates=self.rates, features=self.features, name="aspp", **parts)(c4, train)
        low = self.cbr(c1, self.low_features, 1, "low_conv", 0, train, use_bias=True)
        high = self.cbr(aspp, self.features, 3, "head", 0, train, use_bias=False, dropout=True, sample_ids=sample_ids)
        feats = jnp.concatenate([low, resize_align_corners(high, c1.shape[1:3])], axis=-1)

        def two_conv_head(name, out):
            y = self.cbr(feats, self.features, 3, name, 0, train, use_bias=True, dropout=True, sample_ids=sample_ids)
            y = self.cbr(y, self.features, 3, name, 4, train, use_bias=True, dropout=True, sample_ids=sample_ids)
            return conv(out, 1, use_bias=True, name=f"{name}_8", **kw)(y).astype(jnp.float32)

        pred = two_conv_head("classifier", self.num_classes)
        rep = two_conv_head("representation", self.rep_dim) if with_rep else None
        return pred, rep


class U2PLAux(_Parts):
    """`Aux_Module` on layer3: 3x3 conv (bias) -> BN -> ReLU -> Dropout2d(0.1) -> 1x1 conv; float32 out."""

    num_classes: int = 19
    features: int = 256

    @nn.compact
    def __call__(self, c3, train: bool, sample_ids):
        y = self.cbr(c3, self.features, 3, "aux", 0, train, use_bias=True, dropout=True, sample_ids=sample_ids)
        return conv(self.num_classes, 1, use_bias=True, name="aux_4", dtype=self.dtype,
                    param_dtype=self.param_dtype)(y).astype(jnp.float32)


class U2PLDeepLabV3Plus(nn.Module):
    """U2PL's segmentation network (see the module docstring). Returns `(logits, out)` as every model.

    logits: the stride-4 prediction resized to the input with align_corners (what U2PL evaluates).
    out (train mode or at init): 'pred' (B, h4, w4, C), 'rep' (B, h4, w4, rep_dim) and, with
    `aux`, 'aux' (B, h8, w8, C) from layer3; all float32. In inference only 'pred'.
    """

    num_classes: int
    depth: int = 101
    stem: str = "deep"
    output_stride: int = 8
    multi_grid: bool = True
    maxpool_ceil: bool = True
    width: int = 64
    blocks: Optional[Tuple[int, ...]] = None
    aspp_rates: Tuple[int, ...] = (12, 24, 36)
    head_width: int = 256
    low_width: int = 256
    rep_dim: int = 256
    aux: bool = False
    dropout_rate: float = DROPOUT_RATE
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, feature_perturb: bool = False,
                 sample_ids: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """x: (B, H, W, 3) float32 normalised; sample_ids: (B,) global ids keying the Dropout2d masks."""
        if feature_perturb:
            raise ValueError("the U2PL model has no feature perturbation (feature_perturb=True)")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_axis_name=self.bn_axis_name)
        c1, c3, c4 = ResNet(depth=self.depth, stem=self.stem, output_stride=self.output_stride,
                            multi_grid=self.multi_grid, maxpool_ceil=self.maxpool_ceil, width=self.width,
                            blocks=self.blocks, remat=self.remat, name="backbone", **kw)(x.astype(self.dtype), train)
        parts = dict(kw, dropout_rate=self.dropout_rate)
        full = train or self.is_initializing()
        decoder = U2PLDecoder(num_classes=self.num_classes, rates=tuple(self.aspp_rates), features=self.head_width,
                              low_features=self.low_width, rep_dim=self.rep_dim, name="decoder", **parts)
        pred, rep = decoder(c1, c4, train, sample_ids, full)
        out = {"pred": pred}
        if full:
            out["rep"] = rep
            if self.aux:
                aux = U2PLAux(num_classes=self.num_classes, features=self.head_width, name="auxor", **parts)
                out["aux"] = aux(c3, train, sample_ids)
        return resize_align_corners(pred, x.shape[1:3]), out


def build_u2pl(model_cfg: ml_collections.ConfigDict, num_classes: int,
               bn_axis_name: Optional[str] = None) -> U2PLDeepLabV3Plus:
    """The U2PL network from `config.model` (registry name 'u2pl').

    Reads depth, stem, output_stride, multi_grid, maxpool_ceil, width, blocks, aspp_rates,
    head_width (ASPP / head / classifier width, 256), reduce_width (the low-level path, 256 in
    U2PL), rep_dim (256), aux (Cityscapes), dtype, remat.
    """
    blocks = model_cfg.get("blocks", None)
    defaults = U2PLDeepLabV3Plus.__dataclass_fields__
    fields = ("depth", "stem", "output_stride", "multi_grid", "maxpool_ceil", "width", "head_width", "rep_dim",
              "aux", "remat")
    kwargs = {f: model_cfg.get(f, defaults[f].default) for f in fields}
    return U2PLDeepLabV3Plus(num_classes=num_classes, blocks=None if blocks is None else tuple(blocks),
                             aspp_rates=tuple(model_cfg.get("aspp_rates", defaults["aspp_rates"].default)),
                             low_width=model_cfg.get("reduce_width", defaults["low_width"].default),
                             dtype=compute_dtype(model_cfg), bn_axis_name=bn_axis_name, **kwargs)


#: top-level entries of an official U2PL checkpoint (`train_semi.py` saves both networks).
CHECKPOINT_KEYS = ("teacher_state", "model_state")


def is_u2pl_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether a flat state dict (`module.` prefixes stripped) has U2PL's `encoder.` / `decoder.` keys."""
    return any(k.startswith("encoder.") for k in state_dict) and any(k.startswith("decoder.") for k in state_dict)


def is_u2pl_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether `checkpoint` is a U2PL file: {'teacher_state' / 'model_state', ...} or `encoder.` + `decoder.` keys."""
    if any(k in checkpoint for k in CHECKPOINT_KEYS):
        return True
    keys = [k.replace("module.", "") for k in checkpoint]
    return any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys)


def u2pl_state_dict(checkpoint: Mapping[str, Any], network: str = "teacher") -> tuple[Dict[str, Any], list]:
    """The flat state dict of one network of an official U2PL checkpoint, with csl_jax's key names.

    Args:
      checkpoint: {'teacher_state', 'model_state', ...} as saved by train_semi.py ('model_state'
        only for train_sup.py), or a flat state dict; `module.` prefixes are removed.
      network: 'teacher' (what U2PL evaluates after the supervised-only epochs) or 'student'.
    Returns:
      ({key: tensor} with `encoder.` renamed `backbone.`, `decoder.*` and `auxor.*` unchanged;
      the ignored top-level entries, e.g. ['best_miou', 'epoch', 'model_state', 'optimizer_state']).
    """
    if network not in ("teacher", "student"):
        raise ValueError(f"network must be 'teacher' or 'student', got {network!r}")
    sd, ignored = checkpoint, []
    if any(k in checkpoint for k in CHECKPOINT_KEYS):
        key = "teacher_state" if network == "teacher" and "teacher_state" in checkpoint else "model_state"
        sd, ignored = checkpoint[key], sorted(k for k in checkpoint if k != key)
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out["backbone." + k[len("encoder."):] if k.startswith("encoder.") else k] = v
    return out, ignored


def from_u2pl(checkpoint: Mapping[str, Any], num_classes: int = 21, network: str = "teacher",
              **model_kwargs) -> tuple[U2PLDeepLabV3Plus, Dict[str, Any]]:
    """(model, {'params', 'batch_stats'}) of one network of an official U2PL checkpoint.

    The auxiliary head is built when the checkpoint has `auxor.*`; head_width, low_width and
    rep_dim are read from the decoder's weights; other U2PLDeepLabV3Plus fields (depth, width,
    blocks, output_stride, aspp_rates, ...) are keyword arguments. Every variable must be present.
    """
    from csl_jax.models import convert  # here, not at import: see csl_jax.models.converters

    sd, _ = u2pl_state_dict(checkpoint, network)
    model_kwargs.setdefault("aux", any(k.startswith("auxor.") for k in sd))
    widths = {"head_width": "decoder.head.0.weight", "low_width": "decoder.low_conv.0.weight",
              "rep_dim": "decoder.representation.8.weight"}
    for field, key in widths.items():  # read from the checkpoint (256 each in U2PL)
        if key in sd:
            model_kwargs.setdefault(field, int(sd[key].shape[0]))
    model = U2PLDeepLabV3Plus(num_classes=num_classes, **model_kwargs)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 65, 65, 3)), train=False))
    variables, _ = convert.merge_variables(abstract, convert.convert_state_dict(sd),
                                           allow_missing_outside_backbone=False)
    return model, variables


register_model("u2pl", build_u2pl)
register_converter("u2pl", layout="{'teacher_state', 'model_state', ...} or `encoder.*` + `decoder.*` keys",
                   detect=is_u2pl_checkpoint, unwrap=u2pl_state_dict, build=from_u2pl, raw=True)
