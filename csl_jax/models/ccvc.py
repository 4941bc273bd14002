"""CCVC's two-branch network (docs/methods/ccvc.md §1): two complete DeepLabV3+, nothing shared.

    branch1: DeepLabV3+ (UniMatch layout); features f1 = the 304-ch decoder concat
             [reduce(c1); upsampled ASPP(c4)] at stride 4.
    branch2: the same with a mapping between concat and fuse: 1x1 conv without bias (`mapping_0`),
             BN (`mapping_1`), ReLU, Dropout2d(0.5) (active in every train-mode pass, keyed by the
             global sample ids, off in inference); f2 = the mapped, dropped-out concat.

Parameter tree: {'branch1': DeepLabV3Plus tree, 'branch2': the same + 'mapping_0', 'mapping_1'},
the official keys with the `branch1.` / `branch2.` prefixes (`branch2.mapping.{0,1}` ->
`branch2/mapping_{0,1}`), so `csl_jax.models.convert.flax_path` maps them as they are.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from csl_jax.models.converters import register_converter, unchanged
from csl_jax.models.deeplabv3plus import DeepLabV3Plus
from csl_jax.models.layers import BatchNorm, Dropout2d, conv
from csl_jax.models.registry import build_deeplabv3plus, register_model

BRANCHES = ("branch1", "branch2")
#: Dropout2d rate of branch 2's mapping (`--dropout`, default 0.5 in the official code).
MAPPING_DROPOUT = 0.5


class CCVCBranch(DeepLabV3Plus):
    """One CCVC branch: DeepLabV3+ returning its discrepancy features; `mapping` adds branch 2's.

    Attributes (besides DeepLabV3Plus's): mapping (bool), mapping_dropout (Dropout2d rate).
    """

    mapping: bool = False
    mapping_dropout: float = MAPPING_DROPOUT

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, feature_perturb: bool = False,
                 sample_ids: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """x (B, H, W, 3) float32 -> (logits (B, H, W, C) float32, {'features': (B, H/4, W/4, 304)}).

        features are in the compute dtype, post-ReLU (non-negative). sample_ids: (B,) int32 global
        ids keying the mapping's Dropout2d masks (default arange(B)); feature_perturb must be False.
        """
        if feature_perturb:
            raise ValueError("CCVC branches have no feature perturbation (feature_perturb=True)")
        c1, _, c4 = self.encode(x, train)
        features = self.decoder_concat(c1, c4, train)
        if self.mapping:
            width = features.shape[-1]
            y = conv(width, 1, name="mapping_0", dtype=self.dtype, param_dtype=self.param_dtype)(features)
            y = nn.relu(BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name="mapping_1")(y, not train))
            features = Dropout2d(self.mapping_dropout, name="mapping_dropout")(y, not train, sample_ids)
        logits = self.classify(self.decoder_fuse(features, train), x.shape[1:3])
        return logits, {"features": features}


class CCVCNet(nn.Module):
    """The two branches on the same input; returns their logit average and each branch's outputs.

    `branch1` / `branch2` are CCVCBranch modules (adopted as the submodules of those names); use
    them unbound to initialise or run one branch alone with its own variables.
    """

    branch1: CCVCBranch
    branch2: CCVCBranch

    def __call__(self, x: jax.Array, train: bool, feature_perturb: bool = False,
                 sample_ids: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """x (B, H, W, 3) -> ((z1 + z2) / 2, {'logits_branch1', 'logits_branch2' (B, H, W, C) float32,
        'features_branch1', 'features_branch2' (B, H/4, W/4, 304)})."""
        out = {}
        for name in BRANCHES:
            logits, extra = getattr(self, name)(x, train, feature_perturb, sample_ids)
            out[f"logits_{name}"], out[f"features_{name}"] = logits, extra["features"]
        return (out["logits_branch1"] + out["logits_branch2"]) / 2, out


def _branch_fields(base: DeepLabV3Plus) -> Dict[str, Any]:
    """The constructor fields of a DeepLabV3Plus (not parent/name)."""
    return {f.name: getattr(base, f.name) for f in dataclasses.fields(base)
            if f.init and f.name not in ("parent", "name")}


def build_ccvc(model_cfg: ml_collections.ConfigDict, num_classes: int,
               bn_axis_name: Optional[str] = None) -> CCVCNet:
    """CCVCNet from `config.model` (DeepLabV3Plus fields as in configs/common.py, plus optional
    `mapping_dropout`, default 0.5); both branches share every architecture field."""
    fields = _branch_fields(build_deeplabv3plus(model_cfg, num_classes, bn_axis_name))
    rate = float(model_cfg.get("mapping_dropout", MAPPING_DROPOUT))
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"config.model.mapping_dropout must be in [0, 1), got {rate}")
    return CCVCNet(branch1=CCVCBranch(**fields), branch2=CCVCBranch(**fields, mapping=True, mapping_dropout=rate))


def is_ccvc_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether a flat state dict has CCVC's two-branch keys (`branch1.backbone.*`; CPCL's have them too,
    so csl_jax.models.convert.DETECTION_ORDER asks CPCL first)."""
    return any(k.startswith("branch1.backbone.") for k in state_dict)


def from_ccvc(state_dict: Mapping[str, Any], num_classes: int = 21, depth: int = 101, output_stride: int = 16,
              aspp_rates: Tuple[int, ...] = (6, 12, 18), **model_fields) -> Tuple[CCVCNet, Dict[str, Any]]:
    """CCVCNet and its variables from an official CCVC checkpoint (`model.module.state_dict()`).

    Keys `branch1.*` / `branch2.*` (optionally under `module.` or `model`); every variable of the
    network must be present. `model_fields`: other `config.model` fields (width, blocks, stem,
    multi_grid, ...). Returns (model, {'params', 'batch_stats'} of float32 NumPy arrays).
    """
    from csl_jax.models import convert  # here, not at import: see csl_jax.models.converters

    sd, kind, _ = convert.unwrap_state_dict(state_dict)
    if kind != "ccvc":
        raise ValueError(f"from_ccvc expects a CCVC two-branch checkpoint (`branch1.*` keys), got a {kind!r} one")
    cfg = dict(model_fields, depth=depth, output_stride=output_stride, aspp_rates=tuple(aspp_rates))
    model = build_ccvc(ml_collections.ConfigDict(cfg), num_classes)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 65, 65, 3)), train=False))
    variables, _ = convert.merge_variables(abstract, convert.convert_state_dict(sd),
                                           allow_missing_outside_backbone=False)
    return model, variables


def count_params(model: CCVCNet, image_size: int = 65) -> int:
    """Trainable parameters of `model` from an abstract init (no arrays allocated)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, image_size, image_size, 3)),
                                               train=False))
    return int(sum(x.size for x in jax.tree.leaves(shapes["params"])))


register_model("ccvc", build_ccvc)
register_converter("ccvc", layout="`branch1.backbone.*` / `branch2.*` keys",
                   detect=is_ccvc_state_dict, unwrap=unchanged, build=from_ccvc)
