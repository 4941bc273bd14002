"""CSS's DeepLabV3+ with a representation head (docs/methods/css.md "Networks"; official
`generalframeworks/networks/deeplabv3/deeplabv3.py` `DeepLabv3Plus_with_rep`).

The UniMatch-layout DeepLabV3+ (deeplabv3plus.py) up to the decoder concat [reduce(c1) (48 ch);
upsampled ASPP(c4) (256 ch)] at stride 4; then, instead of `fuse` + a 1x1 classifier, two heads
read the concat, each a 3x3 conv without bias -> BN -> ReLU -> 1x1 conv with bias:
  classifier      -> C classes        representation -> rep_dim (256)
No dropout anywhere. CSS's backbone is the torchvision ResNet made OS8 by "nostride-dilate", which
is torchvision's replace_stride_with_dilation [F, T, T] without multi-grid, ASPP 12/24/36.

Parameter tree (official key -> Flax path; `flax_path` joins numeric parts with '_'):
  resnet_conv1 / resnet_bn1 / resnet_layer{1..4}  -> backbone/conv1, bn1, layer{i}_{j}/...
  ASPP.convs.{0..3}.{0,1}                          -> head/b{i}_{0,1}
  ASPP.convs.4.{1,2}                               -> head/b4/gap_{1,2}
  ASPP.project.{0,1}                               -> head/project_{0,1}
  project.{0,1}                                    -> reduce_{0,1}
  classifier.{0,1,3}, representation.{0,1,3}       -> classifier_{0,1,3}, representation_{0,1,3}
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from csl_jax.models.converters import register_converter
from csl_jax.models.deeplabv3plus import DeepLabV3Plus
from csl_jax.models.layers import BatchNorm, conv, resize_align_corners
from csl_jax.models.registry import build_deeplabv3plus, register_model

NAME = "css"
#: top-level entries of an official CSS checkpoint (`cross_label.py` saves both networks).
CHECKPOINT_KEYS = ("ema_model", "model")


class CSSDeepLabV3Plus(DeepLabV3Plus):
    """CSS network. Returns `(logits, out)` as every model.

    logits: (B, H, W, C) float32, the stride-4 prediction resized to the input (align_corners),
    what CSS evaluates. out (train mode or at init): 'pred' (B, h4, w4, C) and 'rep'
    (B, h4, w4, rep_dim), float32, not upsampled; {} in inference.
    """

    rep_dim: int = 256

    def head(self, concat: jax.Array, name: str, out: int, train: bool) -> jax.Array:
        """`name`_0 3x3 conv (no bias) -> `name`_1 BN -> ReLU -> `name`_3 1x1 conv (bias); float32 out."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = conv(self.head_width, 3, name=f"{name}_0", **kw)(concat)
        y = nn.relu(BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name=f"{name}_1")(y, not train))
        return conv(out, 1, use_bias=True, name=f"{name}_3", **kw)(y).astype(jnp.float32)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, feature_perturb: bool = False,
                 sample_ids: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """x: (B, H, W, 3) float32 normalised; feature_perturb must be False; sample_ids unused."""
        del sample_ids
        if feature_perturb:
            raise ValueError("the CSS model has no feature perturbation (feature_perturb=True)")
        c1, _, c4 = self.encode(x, train)
        concat = self.decoder_concat(c1, c4, train)
        pred = self.head(concat, "classifier", self.num_classes, train)
        out = {}
        if train or self.is_initializing():
            out = {"pred": pred, "rep": self.head(concat, "representation", self.rep_dim, train)}
        return resize_align_corners(pred, x.shape[1:3]), out


def build_css(model_cfg: ml_collections.ConfigDict, num_classes: int,
              bn_axis_name: Optional[str] = None) -> CSSDeepLabV3Plus:
    """The CSS network from `config.model` (registry name 'css'): the DeepLabV3Plus fields
    (registry.build_deeplabv3plus) and rep_dim (256)."""
    base = build_deeplabv3plus(model_cfg, num_classes, bn_axis_name)
    fields = {f: getattr(base, f) for f in DeepLabV3Plus.__dataclass_fields__ if f not in ("parent", "name")}
    return CSSDeepLabV3Plus(rep_dim=int(model_cfg.get("rep_dim", 256)), **fields)


def is_css_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether `checkpoint` is a CSS file ({'ema_model', 'model', ...}) or a flat state dict with its
    `resnet_conv1.` keys (`module.` prefixes allowed)."""
    if "ema_model" in checkpoint:
        return True
    return any(k.replace("module.", "").startswith("resnet_conv1.") for k in checkpoint)


_RENAMES = (
    (r"^resnet_(conv1|bn1|layer\d)\.", r"backbone.\1."),
    (r"^ASPP\.convs\.4\.(\d)\.", r"head.b4.gap.\1."),
    (r"^ASPP\.convs\.(\d)\.", r"head.b\1."),
    (r"^ASPP\.project\.", "head.project."),
    (r"^project\.", "reduce."),
)


def css_state_dict(checkpoint: Mapping[str, Any], network: str = "teacher") -> tuple[Dict[str, Any], list]:
    """The flat state dict of one network of an official CSS checkpoint, with csl_jax's key names.

    Args:
      checkpoint: {'model', 'ema_model', 'optimizer', 'lr_scheduler', 'prototypes', 'epoch'} as
        saved by cross_label.py, or a flat `DeepLabv3Plus_with_rep` state dict.
      network: 'teacher' ('ema_model', what CSS evaluates) or 'student' ('model').
    Returns:
      ({renamed key: tensor}, the ignored top-level entries).
    """
    if network not in ("teacher", "student"):
        raise ValueError(f"network must be 'teacher' or 'student', got {network!r}")
    sd, ignored = checkpoint, []
    if any(k in checkpoint and isinstance(checkpoint[k], Mapping) for k in CHECKPOINT_KEYS):
        key = "ema_model" if network == "teacher" and "ema_model" in checkpoint else "model"
        sd, ignored = checkpoint[key], sorted(k for k in checkpoint if k != key)
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        for pattern, repl in _RENAMES:
            k, n = re.subn(pattern, repl, k)
            if n:
                break
        out[k] = v
    return out, ignored


def from_css(checkpoint: Mapping[str, Any], num_classes: int = 21, network: str = "teacher",
             **model_kwargs) -> tuple[CSSDeepLabV3Plus, Dict[str, Any]]:
    """(model, {'params', 'batch_stats'}) of one network of an official CSS checkpoint.

    Defaults are CSS's: torchvision stem, OS8 without multi-grid, floor max-pool, ASPP 12/24/36;
    head_width, reduce_width and rep_dim are read from the weights; other fields (depth, width,
    blocks, ...) are keyword arguments. Every variable must be present.
    """
    from csl_jax.models import convert  # here, not at import: see csl_jax.models.converters

    sd, _ = css_state_dict(checkpoint, network)
    widths = {"head_width": "head.project.0.weight", "reduce_width": "reduce.0.weight",
              "rep_dim": "representation.3.weight"}
    for field, key in widths.items():
        if key in sd:
            model_kwargs.setdefault(field, int(sd[key].shape[0]))
    for field, value in dict(stem="torchvision", output_stride=8, multi_grid=False, maxpool_ceil=False,
                             aspp_rates=(12, 24, 36)).items():
        model_kwargs.setdefault(field, value)
    model = CSSDeepLabV3Plus(num_classes=num_classes, **model_kwargs)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 65, 65, 3)), train=False))
    variables, _ = convert.merge_variables(abstract, convert.convert_state_dict(sd),
                                           allow_missing_outside_backbone=False)
    return model, variables


register_model(NAME, build_css)
register_converter(NAME, layout="{'ema_model', 'model', 'prototypes', ...} or `resnet_conv1.*` keys",
                   detect=is_css_checkpoint, unwrap=css_state_dict, build=from_css, raw=True)
