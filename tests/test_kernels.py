"""csl_jax.models.layers.kernels: the train-time kernels (fused BatchNorm, dilated convs with GEMM weight
gradients, bfloat16 logit resize) against the plain JAX formulations they replace, on a whole network.

The kernels themselves are tested against float64 references in tests/test_batchnorm.py,
tests/test_dilated_conv.py and tests/test_resize_bf16.py; here: the switch, and that a tiny DeepLabV3+
at OS8 (dilated layer4 and ASPP, 14 train-mode BatchNorms) gives the same train-mode loss, gradients and
running statistics with either, in float32.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs.common import TINY_MODEL
from csl_jax.models import DeepLabV3Plus, layers
from csl_jax.models.dilated import DilatedConv


def test_the_switch_is_scoped_and_checked():
    assert layers.fast_kernels()
    with layers.kernels("reference"):
        assert not layers.fast_kernels()
        assert type(layers.conv(4, 3, dilation=2, name="c")) is nn.Conv
        with layers.kernels("fast"):
            assert layers.fast_kernels() and isinstance(layers.conv(4, 3, dilation=2, name="c"), DilatedConv)
        assert not layers.fast_kernels()
    assert layers.fast_kernels()
    with pytest.raises(ValueError, match="kernels must be one of"):
        with layers.kernels("fused"):
            pass
    assert layers.fast_kernels()


def test_an_explicit_batchnorm_choice_wins_over_the_switch():
    x = np.random.default_rng(0).normal(3.0, 2.0, (4, 5, 5, 3)).astype(np.float32)
    uses_custom_vjp = {}
    for fused in (None, True, False):
        bn = layers.BatchNorm(fused=fused)
        variables = bn.init(jax.random.PRNGKey(0), x, use_running_average=False)
        with layers.kernels("reference"):
            jaxpr = jax.make_jaxpr(lambda v, x: bn.apply(v, x, use_running_average=False, mutable=["batch_stats"]))(
                variables, x)
        uses_custom_vjp[fused] = any(e.primitive.name.startswith("custom_vjp") for e in jaxpr.jaxpr.eqns)
    assert uses_custom_vjp == {None: False, True: True, False: False}


def _train_outputs(kernels: str, dtype=np.float32):
    """(loss, {path: grad}, {path: new batch stat}) of a tiny OS8 DeepLabV3+ in train mode, in `dtype`."""
    model = DeepLabV3Plus(5, output_stride=8, aspp_rates=(2, 3, 5), dtype=jnp.dtype(dtype), **TINY_MODEL)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 33, 33, 3))
    w = rng.standard_normal((4, 33, 33, 5)).astype(dtype)
    variables = model.init(jax.random.PRNGKey(0), x.astype(np.float32), train=False)
    variables = jax.tree.map(lambda v: jnp.asarray(np.asarray(v), dtype), variables)

    def loss(params):
        (logits, _), new = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x.astype(dtype),
                                       train=True, mutable=["batch_stats"])
        return jnp.sum(logits * w), new["batch_stats"]

    with layers.kernels(kernels):
        (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    as_numpy = functools.partial(jax.tree.map, lambda v: np.asarray(v, np.float64))
    return float(value), as_numpy(traverse_util.flatten_dict(grads)), as_numpy(traverse_util.flatten_dict(stats))


def test_a_network_trains_the_same_with_either_kernels():
    """Both float32 runs against the plain formulation in float64: loss to 1e-5, every gradient leaf to 2e-5
    of the gradient's scale (measured: fast 3.9e-6, reference 5.1e-6), running statistics to 1e-5."""
    with jax.enable_x64(True):
        exact = _train_outputs("reference", np.float64)
        runs = {kernels: _train_outputs(kernels) for kernels in layers.KERNELS}
    scale = max(float(np.abs(g).max()) for g in exact[1].values())
    for kernels, (value, grads, stats) in runs.items():
        assert value == pytest.approx(exact[0], rel=1e-5), kernels
        for key, grad in grads.items():
            assert float(np.abs(grad - exact[1][key]).max()) < 2e-5 * scale, (kernels, key)
        for key, stat in stats.items():
            np.testing.assert_allclose(stat, exact[2][key], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{kernels} {key}")


def test_main_runs_inside_the_configs_kernels(tmp_path):
    """`config.model.kernels` reaches the trace and is saved: main.py's 2-step demo losses with 'fast' and
    'reference' differ, by rounding only; a run saved before the field existed counts as 'reference'
    (registry.LATER_FIELDS: the formulations it ran)."""
    import json

    from csl_jax.models import registry
    from tests.test_cli import run_main

    assert registry.LATER_FIELDS["kernels"] == "reference"
    losses = {}
    for kernels in layers.KERNELS:
        workdir = tmp_path / kernels
        code, _, err = run_main(["--config=configs/demo.py", f"--workdir={workdir}",
                                 f"--config.model.kernels={kernels}", f"--config.data.root={tmp_path / 'data'}",
                                 "--config.optim.total_steps=2",
                                 "--config.eval.every_steps=0", "--config.log_every_steps=1"], timeout=600)
        assert code == 0, err
        assert json.loads((workdir / "config.json").read_text())["model"]["kernels"] == kernels
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        losses[kernels] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["fast"]) == 2 and losses["fast"] != losses["reference"]
    np.testing.assert_allclose(losses["fast"], losses["reference"], rtol=1e-5)
