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
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import common, demo
from csl_jax import checkpoint, parallel, train
from csl_jax.evaluation import modes
from csl_jax.methods import METHODS, Method, StepContext, build_method, ccvc, cpcl, css, register_method, u2pl
from csl_jax.methods.base import init_network
from csl_jax.methods.parts import passes
from data_prep import synthetic

NUM_CLASSES = 5  # the synthetic set (data_prep/synthetic.py)
CROP = 32
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
#: every registered method, and the named variants of a method that change its step ('NAME:VARIANT')
NAMES = sorted(METHODS) + ["u2pl:intended"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.prepare(root, num_train=32, num_val=4, image_size=(40, 40), seed=0)
    return str(root)


#: name -> setup of a method's own model and options on the demo config (CutMix groups of 2: the
#: local batch of 8 devices)
def _u2pl(variant):
    return lambda c: u2pl.configure(c, variant).update(
        model=dict(rep_dim=8), method=dict(queue_capacity=300, queue_capacity_class0=500, num_queries=16,
                                           num_negatives=4))


METHOD_SETUP = {"ccvc": lambda c: ccvc.configure(c).method.update(mix_group=2),
                "u2pl": _u2pl("reference"), "u2pl:intended": _u2pl("intended"),
                "css": lambda c: css.configure(c).update(model=dict(rep_dim=8),
                                                         method=dict(num_queries=16, num_negatives=8)),
                "cpcl": cpcl.configure}


def contract_config(data_root, name, **overrides):
    """The demo config of `name`, tiny: crop 32, batches of 16, one loss group of 2 per device of 8."""
    c = demo.get_config(name if name in ("csl", "unimatch", "fixmatch") else "supervised")
    c.method.name = name
    if name in METHOD_SETUP:
        METHOD_SETUP[name](c)
    c.data.update(root=data_root, crop_size=CROP, split="1_2", block_size=8)
    common.tiny_model(c, width=4, head_width=8, reduce_width=4)
    c.batch.update(labeled=16, unlabeled=16)
    c.loss.group_size = 2  # whole groups in every micro-batch: exact accumulation (groups over devices: test_semi)
    c.update(log_every_steps=1, checkpoint_every_steps=2)
    c.eval.update(every_steps=2, batch_size=8, num_plot_images=1)
    c.optim.update(total_steps=4, lr=0.01)
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        target = c
        for p in path:
            target = target[p]
        target[leaf] = value
    return c


def two_batches(config, method):
    """The first two global batches of the method's streams (host NumPy, from the real pipeline)."""
    streams = train.make_streams(config, method)
    return [streams.next() for _ in range(2)]


def run_steps(config, method, batches, devices, accum_steps=1):
    """(params, state, [loss of each step]) after one step per batch on a mesh of `devices`."""
    mesh = parallel.make_mesh(devices)
    tx = optax.sgd(0.01, momentum=0.9)
    ts = parallel.replicate(train.create_train_state(method, tx, jax.random.PRNGKey(0), (CROP, CROP, 3)), mesh)
    step = train.make_train_step(method, tx, mesh, seed=0, steps_per_epoch=1,
                                 offsets=train.stream_offsets(method, config.batch), accum_steps=accum_steps)
    seen = []
    for batch in batches:
        ts, metrics = step(ts, parallel.to_global(batch, mesh))
        seen.append(float(metrics["loss"]))
    return jax.device_get((ts.params, ts.state)), seen


def assert_trees_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path), **tol)


@pytest.mark.parametrize("name", NAMES)
def test_one_device_equals_eight(data_root, name):
    config = contract_config(data_root, name)
    method = build_method(config, NUM_CLASSES)
    batches = two_batches(config, method)
    (params1, state1), loss1 = run_steps(config, method, batches, jax.devices()[:1])
    (params8, state8), loss8 = run_steps(config, method, batches, jax.devices()[:8])
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    # float32 sums in another order (per-device BN and loss sums, then psum), amplified by two SGD
    # steps: the tolerance of tests/test_train_step.py's 1-vs-8 reference test
    assert_trees_close(params8, params1, rtol=1e-4, atol=5e-5)
    assert_trees_close(state8, state1, rtol=1e-4, atol=5e-5)
    if name == "toy_two_networks":
        assert int(state1["calls"]) == 2  # written inside the loss, once per step


def reference_accumulation(config, method, batch, devices):
    """(params, state, loss) of one accum_steps=2 step, written out: per device, micro-batch k (the
    k-th half of its share) runs the loss with the state left by micro-batch k-1 and the key
    fold_in(fold_in(seed key, step), k); the gradients and metrics are averaged over micro-batches
    and devices; SGD step; `after_update`."""
    mesh = parallel.make_mesh(devices)
    tx = optax.sgd(0.01, momentum=0.9)
    ts = parallel.replicate(train.create_train_state(method, tx, jax.random.PRNGKey(0), (CROP, CROP, 3)), mesh)
    offsets = train.stream_offsets(method, config.batch)

    def per_device(ts, batch):
        step_rng = jax.random.fold_in(jax.random.PRNGKey(0), ts.step)
        state, grads, losses = ts.state, [], []
        for k in range(2):
            micro = jax.tree.map(lambda x, k=k: x[k * x.shape[0] // 2:(k + 1) * x.shape[0] // 2], batch)
            ctx = StepContext(rng=jax.random.fold_in(step_rng, k), step=ts.step,
                              device_index=jax.lax.axis_index(parallel.AXIS), num_devices=len(devices),
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
    batch = two_batches(config, method)[0]
    devices = jax.devices()[:2]  # 8 images per device: micro-batches of 4, two loss groups each
    (params, state), (loss,) = run_steps(config, method, [batch], devices, accum_steps=2)
    ref_params, ref_state, ref_loss = reference_accumulation(config, method, batch, devices)
    np.testing.assert_allclose(loss, float(ref_loss), rtol=1e-6)
    assert_trees_close(params, ref_params, rtol=1e-5, atol=1e-6)
    assert_trees_close(state, ref_state, rtol=1e-5, atol=1e-6)
    if name == "toy_two_networks":
        assert int(state["calls"]) == 2  # carried from micro-batch to micro-batch


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

    state_a, data_a, step_a = checkpoint.Checkpointer(straight).restore(None)
    state_b, data_b, step_b = checkpoint.Checkpointer(resumed).restore(None)
    assert step_a == step_b == 4 and data_a == data_b
    assert set(data_a) == set(build_method(contract_config(data_root, name), NUM_CLASSES).streams())
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))  # bit for bit on CPU

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
