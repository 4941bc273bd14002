"""CPCL's two-branch network (docs/methods/cpcl.md §1): two CPS-style DeepLabV3+, nothing shared.

Each branch (`SingleNetwork` of the official `exp_*/network.py`):
  backbone    deep-stem ResNet; layer4 without stride, its 3x3 convs dilated 2, 4, 8 (= csl_jax's
              output_stride 16 with multi_grid, set by csl_jax.methods.cpcl.configure);
  head.aspp   four maps (1x1, 3x3 at the rates) concatenated, `map_bn`, LeakyReLU(0.01), `red_conv`
              1x1; image pooling (mean, 1x1, BN, LeakyReLU, `pool_red_conv` 1x1) ADDED to the maps;
              `red_bn`, LeakyReLU;
  head        `reduce` 1x1 -> BN -> ReLU on c1; concat [upsampled aspp, reduced c1]; `last_conv`
              two 3x3 conv-BN-ReLU;
  classifier  1x1 with bias; logits resized to the input with align_corners.

Parameter tree = the official keys with numeric indices joined by '_' (csl_jax.models.convert.flax_path):
  branch{1,2}.backbone.*                          -> branch{k}/backbone/...
  branch{k}.head.aspp.map_convs.{0..3}            -> branch{k}/head/aspp/map_convs_{i}
  branch{k}.head.aspp.{map_bn, global_pooling_conv, global_pooling_bn, red_conv, pool_red_conv, red_bn}
  branch{k}.head.reduce.{0,1}, head.last_conv.{0,1,3,4}, classifier
Head and classifier kernels: kaiming-normal fan_in (untruncated); classifier bias: PyTorch's default
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (`init_weight` leaves it).
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
from csl_jax.models.layers import BatchNorm, conv, resize_align_corners, resize_logits
from csl_jax.models.registry import build_deeplabv3plus, register_model

BRANCHES = ("branch1", "branch2")
#: torch.nn.LeakyReLU() default slope.
LEAKY_SLOPE = 0.01
#: furnace `init_weight(..., nn.init.kaiming_normal_, mode='fan_in', nonlinearity='relu')`.
head_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _leaky(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, LEAKY_SLOPE)


def torch_bias_init(fan_in: int):
    """PyTorch's default conv bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class CPCLASPP(nn.Module):
    """CPS ASPP (module docstring): (B, h, w, Cin) -> (B, h, w, features), compute dtype."""

    rates: Tuple[int, ...] = (6, 12, 18)
    features: int = 256
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=head_init)

        def bn(name, y):
            return BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name=name)(y, not train)

        maps = [conv(self.features, 1, name="map_convs_0", **kw)(x)]
        maps += [conv(self.features, 3, dilation=r, name=f"map_convs_{i}", **kw)(x)
                 for i, r in enumerate(self.rates, 1)]
        out = conv(self.features, 1, name="red_conv", **kw)(_leaky(bn("map_bn", jnp.concatenate(maps, axis=-1))))
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        pool = _leaky(bn("global_pooling_bn", conv(self.features, 1, name="global_pooling_conv", **kw)(pooled)))
        pool = conv(self.features, 1, name="pool_red_conv", **kw)(pool)
        return _leaky(bn("red_bn", out + pool))  # the (B, 1, 1, F) pooling branch broadcasts


class CPCLHead(nn.Module):
    """`Head`: ASPP on c4, reduce on c1, concat [aspp, low], last_conv. -> (B, h1, w1, head_width)."""

    rates: Tuple[int, ...] = (6, 12, 18)
    head_width: int = 256
    reduce_width: int = 48
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, c1: jax.Array, c4: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=head_init)

        def conv_bn_relu(y, features, kernel, name, index):
            y = conv(features, kernel, name=f"{name}_{index}", **kw)(y)
            bn = BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name=f"{name}_{index + 1}")
            return nn.relu(bn(y, not train))

        high = CPCLASPP(tuple(self.rates), self.head_width, self.dtype, self.param_dtype, self.bn_axis_name,
                        name="aspp")(c4, train)
        low = conv_bn_relu(c1, self.reduce_width, 1, "reduce", 0)
        y = jnp.concatenate([resize_align_corners(high, c1.shape[1:3]), low], axis=-1)
        y = conv_bn_relu(y, self.head_width, 3, "last_conv", 0)
        return conv_bn_relu(y, self.head_width, 3, "last_conv", 3)


class CPCLBranch(DeepLabV3Plus):
    """One CPCL branch (`SingleNetwork`): the DeepLabV3Plus backbone fields, CPCL's head and classifier."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, feature_perturb: bool = False,
                 sample_ids: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """x (B, H, W, 3) float32 ImageNet-normalised -> (logits (B, H, W, C) float32, {})."""
        del sample_ids  # no dropout anywhere
        if feature_perturb:
            raise ValueError("CPCL branches have no feature perturbation (feature_perturb=True)")
        c1, _, c4 = self.encode(x, train)
        features = CPCLHead(tuple(self.aspp_rates), self.head_width, self.reduce_width, self.dtype,
                            self.param_dtype, self.bn_axis_name, name="head")(c1, c4, train)
        logits = nn.Conv(self.num_classes, (1, 1), use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                         kernel_init=head_init, bias_init=torch_bias_init(self.head_width),
                         name="classifier")(features)
        return resize_logits(logits, x.shape[1:3]), {}  # float32 (layers.resize_logits)


class CPCLNet(nn.Module):
    """`Network`: two CPCLBranch modules on the same input (use `branch1` / `branch2` unbound to run one).

    Returns (branch-1 logits, {'logits_branch1', 'logits_branch2'} (B, H, W, C) float32): the
    official eval-mode forward returns branch 1 only.
    """

    branch1: CPCLBranch
    branch2: CPCLBranch

    def __call__(self, x: jax.Array, train: bool, feature_perturb: bool = False,
                 sample_ids: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        out = {f"logits_{name}": getattr(self, name)(x, train, feature_perturb, sample_ids)[0] for name in BRANCHES}
        return out["logits_branch1"], out


def build_cpcl(model_cfg: ml_collections.ConfigDict, num_classes: int,
               bn_axis_name: Optional[str] = None) -> CPCLNet:
    """CPCLNet from `config.model` (DeepLabV3Plus fields as in configs/common.py); both branches alike.

    CPCL's layer4 (no stride, dilations 2/4/8) is output_stride 16 with multi_grid True
    (csl_jax.methods.cpcl.configure sets both).
    """
    base = build_deeplabv3plus(model_cfg, num_classes, bn_axis_name)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)
              if f.init and f.name not in ("parent", "name")}
    return CPCLNet(branch1=CPCLBranch(**fields), branch2=CPCLBranch(**fields))


def is_cpcl_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether a flat state dict has CPCL's two-branch head keys (`branch1.head.aspp.map_convs.*`)."""
    return any(k.startswith("branch1.head.aspp.map_convs.") for k in state_dict)


def from_cpcl(state_dict: Mapping[str, Any], num_classes: int = 21, depth: int = 50,
              aspp_rates: Tuple[int, ...] = (6, 12, 18), **model_fields) -> Tuple[CPCLNet, Dict[str, Any]]:
    """CPCLNet and its variables from an official CPCL checkpoint ({'model': {branch1.*, branch2.*}, ...}).

    The official code trains ResNet-50 (`depth=50`; 101 for the README's R101 rows). Every
    variable of both branches must be present. `model_fields`: other `config.model` fields (width,
    blocks, ...). Returns (model, {'params', 'batch_stats'} of float32 NumPy arrays).
    """
    from csl_jax.models import convert  # here, not at import: see csl_jax.models.converters

    sd, kind, _ = convert.unwrap_state_dict(state_dict)
    if kind != "cpcl":
        raise ValueError(f"from_cpcl expects a CPCL two-branch checkpoint (`branch1.head.aspp.*` keys), got a "
                         f"{kind!r} one")
    cfg = dict(model_fields, depth=depth, aspp_rates=tuple(aspp_rates), output_stride=16, multi_grid=True,
               stem="deep", maxpool_ceil=False)
    model = build_cpcl(ml_collections.ConfigDict(cfg), num_classes)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 65, 65, 3)), train=False))
    variables, _ = convert.merge_variables(abstract, convert.convert_state_dict(sd),
                                           allow_missing_outside_backbone=False)
    return model, variables


def count_params(model: nn.Module, image_size: int = 65) -> int:
    """Trainable parameters of `model` from an abstract init (no arrays allocated)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, image_size, image_size, 3)),
                                               train=False))
    return int(sum(x.size for x in jax.tree.leaves(shapes["params"])))


register_model("cpcl", build_cpcl)
register_converter("cpcl", layout="`branch1.head.aspp.map_convs.*` keys (under `model`)",
                   detect=is_cpcl_state_dict, unwrap=unchanged, build=from_cpcl)
