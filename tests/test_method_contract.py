"""The method contract, over every registered method (a new method joins by registering):

- 1 device equals 8 devices after two steps (loss, params, state);
- `accum_steps=2` equals the mean of the two micro-batch gradients with the state carried from
  one micro-batch to the next (a plain reference of that rule, written out below);
- stop and resume are bit-exact, every evaluation of the method is logged, and the best checkpoint
  evaluates to the same mIoU in `--mode=eval`.

A toy two-network method (two tiny DeepLabV3+ trees with different init, a loss that uses both, a
counter written inside the loss, three predict functions) is registered here: it trains, resumes
and evaluates every branch through the unchanged trainer, the proof that two-network methods
(CCVC, CPCL) and state written in the loss (U2PL queues) fit.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from csl_jax.models import layers
import optax
import pytest
from jax.sharding import PartitionSpec as P

from csl_jax import checkpoint, parallel, train
from csl_jax.evaluation import modes
from csl_jax.methods import METHODS, Method, StepContext, build_method, register_method
from csl_jax.methods.base import init_network
from csl_jax.methods.parts import passes
from csl_jax.workdir import set_fields
from tests.helpers import harness
from tests.helpers.harness import NUM_CLASSES, assert_trees_close

BRANCHES = ("branch1", "branch2")


class TwoNetworks(Method):
    """Two networks trained on the labeled batch: L = L_x(1) + L_x(2) + mean squared softmax gap.

    params {'branch1', 'branch2'}; state {'batch_stats': {'branch1', 'branch2'}, 'calls': int32
    count of loss calls}; predict functions 'branch1', 'branch2' and 'mean' (softmax average, picks
    the best checkpoint).
    """

    best_predict = "mean"

    def init(self, rng, image_shape):
        keys = dict(zip(BRANCHES, jax.random.split(rng)))
        nets = {b: init_network(self.model, self.config.model, keys[b], image_shape) for b in BRANCHES}
        params = {b: nets[b]["params"] for b in BRANCHES}
        return params, {"batch_stats": {b: nets[b]["batch_stats"] for b in BRANCHES},
                        "calls": jnp.zeros((), jnp.int32)}

    def loss(self, params, state, batch, ctx: StepContext):
        lab = batch["labeled"]
        ids = ctx.sample_ids("labeled", lab["image"].shape[0])
        logits, stats = {}, {}
        for b in BRANCHES:
            (logits[b], _), stats[b] = passes.train_pass(self.model, params[b], state["batch_stats"][b], lab["image"],
                                                         rng=ctx.rng, sample_ids=ids)
        gap = jnp.mean(jnp.square(jax.nn.softmax(logits["branch1"]) - jax.nn.softmax(logits["branch2"])))
        loss = sum(self.labeled_loss(logits[b], lab["label"]) for b in BRANCHES) + gap
        calls = state["calls"] + 1
        return loss, ({"batch_stats": stats, "calls": calls}, {"loss": loss, "gap": gap})

    def predict_fns(self):
        def branch(name):
            return lambda variables, images: self.model.apply(variables, images, train=False)[0]

        def mean(variables, images):
            probs = [jax.nn.softmax(self.model.apply(variables[b], images, train=False)[0]) for b in BRANCHES]
            return jnp.log(sum(probs) / 2)

        return {"branch1": branch("branch1"), "branch2": branch("branch2"), "mean": mean}

    def eval_variables(self, train_state, name):
        self._check_predict_name(name)
        nets = {b: {"params": train_state.params[b], "batch_stats": train_state.state["batch_stats"][b]}
                for b in BRANCHES}
        return nets if name == "mean" else nets[name]


if "toy_two_networks" not in METHODS:
    register_method("toy_two_networks", TwoNetworks)
#: 'METHOD:BACKBONE' cases: a method on another backbone, (its method, the `config.model` fields set over the
#: contract's tiny model); Xception-65 narrowed to width 4 / 64 with one middle-flow block
BACKBONE_CASES = {"supervised:xception65": ("supervised", {"model.backbone": "xception65", "model.blocks": (1,)})}
#: every registered method, the named variants of a method that change its step ('NAME:VARIANT') and the
#: backbone cases
NAMES = sorted(METHODS) + ["u2pl:intended", "unimatch_v2:csl", "supervised:dpt"] + sorted(BACKBONE_CASES)
#: the cases of the 1-vs-8-device test. Not the Xception case: its ~2x more activations hold pre-ReLU values
#: within float32 rounding (~1e-7) of zero, which the other summation order of 8 devices flips, each flip
#: moving the gradient by one pixel's share (~1e-3 of its scale here, beyond the per-leaf tolerance);
#: tests/test_xception.py checks SyncBN over 8 devices on an input without such values
DEVICE_COUNT_NAMES = [name for name in NAMES if name not in BACKBONE_CASES]


def contract_config(data_root, name, **overrides):
    """harness.contract_config of `name`, or of a BACKBONE_CASES entry's method with its model fields."""
    if name in BACKBONE_CASES:
        method, fields = BACKBONE_CASES[name]
        return set_fields(harness.contract_config(data_root, method), {**fields, **overrides})
    return harness.contract_config(data_root, name, **overrides)


data_root = harness.data_root


@pytest.mark.parametrize("name", DEVICE_COUNT_NAMES)
@layers.kernels("reference")  # rtol 1e-5 holds for the two-pass BN's rounding (cpcl's losses move by more with the
def test_one_device_equals_eight(data_root, name):  # fused BN's; its device-count test: tests/test_semi.py)
    config = contract_config(data_root, name)
    method = build_method(config, NUM_CLASSES)
    batches = harness.first_batches(config, method)
    one = harness.run_steps(config, method, batches, 1, accum_steps=1)
    eight = harness.run_steps(config, method, batches, 8, accum_steps=1)
    np.testing.assert_allclose(eight.losses, one.losses, rtol=1e-5)
    # float32 sums in another order (per-device BN and loss sums, then psum), amplified by two SGD
    # steps: the tolerance of tests/test_train_step.py's 1-vs-8 reference test
    assert_trees_close(eight.params, one.params, rtol=1e-4, atol=5e-5)
    assert_trees_close(eight.state, one.state, rtol=1e-4, atol=5e-5)
    if name == "toy_two_networks":
        assert int(one.state["calls"]) == 2  # written inside the loss, once per step


def reference_accumulation(config, method, batch, num_devices):
    """(params, state, loss) of one accum_steps=2 step, written out: per device, micro-batch k (the
    k-th half of its share) runs the loss with the state left by micro-batch k-1 and the key
    fold_in(fold_in(seed key, step), k); the gradients and metrics are averaged over micro-batches
    and devices; SGD step; `after_update`."""
    start = harness.Stepper(config, method, num_devices)  # its mesh, SGD and fresh train state
    mesh, tx, ts = start.mesh, start.tx, start.train_state
    offsets = train.stream_offsets(method, config.batch)

    def per_device(ts, batch):
        step_rng = jax.random.fold_in(jax.random.PRNGKey(0), ts.step)
        state, grads, losses = ts.state, [], []
        for k in range(2):
            micro = jax.tree.map(lambda x, k=k: x[k * x.shape[0] // 2:(k + 1) * x.shape[0] // 2], batch)
            ctx = StepContext(rng=jax.random.fold_in(step_rng, k), step=ts.step,
                              device_index=jax.lax.axis_index(parallel.AXIS), num_devices=num_devices,
                              steps_per_epoch=1, stream_offsets=offsets)
            (_, (state, metrics)), g = jax.value_and_grad(method.loss, has_aux=True)(ts.params, state, micro, ctx)
            grads.append(g)
            losses.append(metrics["loss"])
        grads = jax.lax.pmean(jax.tree.map(lambda a, b: (a + b) / 2, *grads), parallel.AXIS)
        updates, _ = tx.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        return params, method.after_update(state, params, ts.step), jax.lax.pmean((losses[0] + losses[1]) / 2,
                                                                                   parallel.AXIS)

    fn = jax.jit(parallel.shard_map(per_device, mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=(P(), P(), P())))
    return jax.device_get(fn(ts, parallel.to_global(batch, mesh)))


@pytest.mark.parametrize("name", NAMES)
def test_gradient_accumulation_is_exact(data_root, name):
    config = contract_config(data_root, name)
    method = build_method(config, NUM_CLASSES)
    batch = harness.first_batches(config, method)[0]
    devices = 2  # 8 images per device: micro-batches of 4, two loss groups each
    run = harness.run_steps(config, method, [batch], devices, accum_steps=2)
    (loss,) = run.losses
    ref_params, ref_state, ref_loss = reference_accumulation(config, method, batch, devices)
    np.testing.assert_allclose(loss, float(ref_loss), rtol=1e-6)
    assert_trees_close(run.params, ref_params, rtol=1e-5, atol=1e-6)
    assert_trees_close(run.state, ref_state, rtol=1e-5, atol=1e-6)
    if name == "toy_two_networks":
        assert int(run.state["calls"]) == 2  # carried from micro-batch to micro-batch


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_exact_and_the_best_checkpoint_evaluates_the_same(data_root, tmp_path, name):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    final = train.train_and_evaluate(contract_config(data_root, name), straight)
    train.train_and_evaluate(contract_config(data_root, name, stop_after_steps=2), resumed)
    assert checkpoint.Checkpointer(resumed).latest_step() == 2
    train.train_and_evaluate(contract_config(data_root, name), resumed)

    _, data_a = harness.assert_same_latest_checkpoint(straight, resumed, 4)  # bit for bit on CPU
    assert set(data_a) == set(build_method(contract_config(data_root, name), NUM_CLASSES).streams())

    # every predict function evaluated at steps 2 and 4; the method's best one picks the checkpoint
    method = build_method(contract_config(data_root, name), NUM_CLASSES)
    logged = [(r["step"], r["evaluation"]) for r in read_jsonl(os.path.join(straight, "eval_results.jsonl"))]
    assert sorted(logged) == sorted((s, p) for s in (2, 4) for p in method.predict_fns())
    assert set(final["evaluations"]) == set(method.predict_fns())
    best_logged = max(r["miou"] for r in read_jsonl(os.path.join(straight, "eval_results.jsonl"))
                      if r["evaluation"] == method.best_predict)
    assert final["best_miou"] == best_logged

    results = modes.evaluate_checkpoint(contract_config(data_root, name), straight, "best")
    assert results["predict"] == method.best_predict
    np.testing.assert_allclose(results["miou"], final["best_miou"], rtol=1e-6)
    if len(method.predict_fns()) > 1:  # another predict function: from the latest train state
        other = next(p for p in method.predict_fns() if p != method.best_predict)
        with pytest.raises(ValueError, match=f"holds the variables of predict function '{method.best_predict}'"):
            modes.evaluate_checkpoint(contract_config(data_root, name), straight, "best", evaluation=other)
        results = modes.evaluate_checkpoint(contract_config(data_root, name), straight, "latest", evaluation=other)
        last = [r for r in read_jsonl(os.path.join(straight, "eval_results.jsonl"))
                if r["step"] == 4 and r["evaluation"] == other]
        np.testing.assert_allclose(results["miou"], last[0]["miou"], rtol=1e-6)
