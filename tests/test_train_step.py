"""The shard_map train step: 1 device == 8 devices == a plain DDP-style reference; accumulation; errors."""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from csl_jax import optim, parallel, train
from csl_jax.methods import build_method
from csl_jax.methods.base import init_network
from csl_jax.methods.parts import losses
from csl_jax.models import build_model
from tests.helpers import harness
from tests.helpers.harness import assert_trees_close

NUM_CLASSES = 5
CROP = 33


def tiny_config(group_size=2):
    c = common.tiny_model(common.get_base_config(), width=4, head_width=8, reduce_width=4)
    c.model.output_stride = 8
    c.model.aspp_rates = (1, 2, 3)
    c.data.crop_size = CROP
    c.loss.group_size = group_size
    c.optim.lr = 0.01  # larger steps amplify float-summation-order noise past the tolerance
    c.optim.weight_decay = 1e-3
    return c


def make_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, CROP, CROP, 3)).astype(np.float32)
    label = rng.integers(0, NUM_CLASSES, size=(n, CROP, CROP)).astype(np.int32)
    label[:, :5] = 255  # some ignored pixels, a different count per image
    label[0, 10:20] = 255
    return {"labeled": {"image": image, "label": label}}


def run_steps(config, num_devices, batches):
    """`harness.run_steps` of the config's method with its optimiser (a 10-step schedule)."""
    return harness.run_steps(config, build_method(config, NUM_CLASSES), batches, num_devices,
                             tx=optim.make_optimizer(config.optim, total_steps=10))


def test_one_vs_eight_devices_vs_reference():
    config = tiny_config(group_size=2)
    batches = [make_batch(16, seed=s) for s in range(2)]
    run8 = run_steps(config, 8, batches)
    run1 = run_steps(config, 1, batches)

    # Reference without shard_map: BN over the whole batch, loss = mean over 2-image groups (what DDP
    # on 8 GPUs with 2 images each averages), torch-style SGD written out by hand.
    model = build_model(config.model, NUM_CLASSES)
    variables = init_network(model, config.model, jax.random.PRNGKey(0), (CROP, CROP, 3))
    params, stats = variables["params"], variables["batch_stats"]
    momentum = jax.tree.map(jnp.zeros_like, params)
    groups = optim.param_groups(params)
    ref_losses = []
    for t, batch in enumerate(batches):
        def loss_fn(p):
            (logits, _), new = model.apply({"params": p, "batch_stats": stats}, batch["labeled"]["image"],
                                           train=True, mutable=["batch_stats"])
            per_group = [losses.ce_loss(logits[i:i + 2], batch["labeled"]["label"][i:i + 2], group_size=2)
                         for i in range(0, 16, 2)]
            return jnp.mean(jnp.stack(per_group)), new["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        ref_losses.append(float(loss))
        scale = (1 - t / 10) ** 0.9
        momentum = jax.tree.map(lambda m, g, p: 0.9 * m + g + 1e-3 * p, momentum, grads, params)
        params = jax.tree.map(
            lambda p, m, g: p - config.optim.lr * scale * (1.0 if g == "backbone" else config.optim.lr_multi) * m,
            params, momentum, groups)

    np.testing.assert_allclose(run8.losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(run1.losses, ref_losses, rtol=1e-5)
    assert_trees_close(run8.params, params, atol=5e-5, rtol=1e-4)
    assert_trees_close(run1.params, params, atol=5e-5, rtol=1e-4)
    assert_trees_close(run8.state["batch_stats"], stats, atol=2e-5, rtol=1e-4)
    assert int(run8.step) == 2


def sgd_first_step(config, params, grads):
    """Params after the first torch-style SGD step (momentum buffer = g + wd p, poly factor 1), by hand."""
    groups = optim.param_groups(params)
    lr, multi, wd = config.optim.lr, config.optim.lr_multi, config.optim.weight_decay
    return jax.tree.map(lambda p, g, group: p - lr * (1.0 if group == "backbone" else multi) * (g + wd * p),
                        params, grads, groups)


def test_gradient_accumulation_matches_hand_reference():
    # 2 devices x 4 images, accum_steps=2: device d holds images [4d, 4d+4) and its micro-batches are
    # [4d, 4d+2) and [4d+2, 4d+4). BN is synced over the 2 devices, so micro-batch k normalises
    # images {2k, 2k+1, 4+2k, 4+2k+1} together and updates the running statistics after micro-batch
    # k-1's; its loss is the mean of one 2-image group per device. The step's gradient is the mean
    # of the two micro-batch gradients; the reference below writes all of this out without shard_map.
    config = tiny_config(group_size=2)
    config.batch.accum_steps = 2
    batch = make_batch(8, seed=3)
    run = run_steps(config, 2, [batch])
    (loss,) = run.losses

    model = build_model(config.model, NUM_CLASSES)
    variables = init_network(model, config.model, jax.random.PRNGKey(0), (CROP, CROP, 3))
    expected = []
    stats = variables["batch_stats"]
    grads_sum = None
    for k in range(2):
        idx = np.array([2 * k, 2 * k + 1, 4 + 2 * k, 4 + 2 * k + 1])

        def loss_fn(p, stats=stats, idx=idx):
            (logits, _), new = model.apply({"params": p, "batch_stats": stats}, batch["labeled"]["image"][idx],
                                           train=True, mutable=["batch_stats"])
            lab = batch["labeled"]["label"][idx]
            return 0.5 * (losses.ce_loss(logits[:2], lab[:2], group_size=2)
                          + losses.ce_loss(logits[2:], lab[2:], group_size=2)), new["batch_stats"]

        (value, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        expected.append(float(value))
        grads_sum = grads if grads_sum is None else jax.tree.map(jnp.add, grads_sum, grads)
    np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
    assert_trees_close(run.state["batch_stats"], stats, atol=2e-5, rtol=1e-4)
    params = sgd_first_step(config, variables["params"], jax.tree.map(lambda g: g / 2, grads_sum))
    # The same sums in another order (per-device BN and loss sums, psum, then the micro-batch sum):
    # float32 noise of ~1e-6 relative on gradients of order 1, times lr x lr_multi = 0.1, gives
    # ~1e-7 on the params (measured 1.2e-7); 1e-6 absolute (no relative slack) keeps 8x margin and
    # is 1e-4 of the step (the params move by up to 1.3e-2).
    assert_trees_close(run.params, params, atol=1e-6, rtol=0)
    assert max_abs_diff(run.params, variables["params"]) > 1e-3  # the step did move the params


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                 jax.tree.leaves(b)))


def bn_counts(model, variables, images):
    """{BN path: values per channel of one train-mode pass over `images`} (batch x height x width)."""
    is_bn = lambda module, _: type(module).__name__ == "BatchNorm"  # noqa: E731
    _, captured = model.apply(variables, images, train=True, mutable=["batch_stats", "intermediates"],
                              capture_intermediates=is_bn)
    leaves = jax.tree_util.tree_leaves_with_path(captured["intermediates"])
    return {tuple(e.key for e in path[:-2]): int(np.prod(x.shape[:-1])) for path, x in leaves}


def test_gradient_accumulation_equals_one_batch_when_micro_batches_agree():
    # accum_steps=2 vs accum_steps=1 on the same global batch. With BN the two differ in general
    # (statistics per micro-batch, two running-statistics updates), so the batch is built for the
    # two to agree exactly: every device's 4 images are one pair twice, [a0 a1 a0 a1 | b0 b1 b0 b1].
    # Then each micro-batch ({a0 a1} | {b0 b1}) has the BN mean and (biased) variance of the whole
    # batch, every loss group is the same, and as functions of the params both losses are equal,
    # hence equal gradients and params after the step.
    config = tiny_config(group_size=2)
    pairs = make_batch(4, seed=4)["labeled"]
    batch = {"labeled": {k: v[[0, 1, 0, 1, 2, 3, 2, 3]] for k, v in pairs.items()}}
    one = run_steps(config, 2, [batch])
    config.batch.accum_steps = 2
    two = run_steps(config, 2, [batch])
    (loss_one,), (loss_two,) = one.losses, two.losses

    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-6)
    # Same gradient up to float32 summation order (BN sums over 8 vs 4 images, two micro-batch
    # gradients summed): ~1e-6 relative on gradients of order 1, times lr x lr_multi = 0.1, gives
    # ~1e-7 on the params (measured 6e-8); 1e-6 absolute (no relative slack) is 1e-4 of the step.
    assert_trees_close(two.params, one.params, atol=1e-6, rtol=0)
    variables = init_network(build_model(config.model, NUM_CLASSES), config.model, jax.random.PRNGKey(0),
                             (CROP, CROP, 3))
    assert max_abs_diff(one.params, variables["params"]) > 1e-3  # the step did move the params

    # Running statistics: accum_steps=1 updates once with the batch's (mean, unbiased var over n
    # values), accum_steps=2 twice with the same mean and biased variance over n/2 values:
    #   one: m0 + 0.1 (mu - m0)          two: m0 + 0.19 (mu - m0)          (momentum 0.9)
    #   one: 0.9 v0 + 0.1 s n/(n-1)      two: 0.81 v0 + 0.19 s (n/2)/(n/2-1)
    # so `two` follows from `one` and the initial statistics, with n per BN layer from the model.
    counts = bn_counts(build_model(config.model, NUM_CLASSES), variables, batch["labeled"]["image"])
    init = flax.traverse_util.flatten_dict(variables["batch_stats"])
    got_one = flax.traverse_util.flatten_dict(one.state["batch_stats"])
    got_two = flax.traverse_util.flatten_dict(two.state["batch_stats"])
    assert set(got_two) == set(init) and {k[:-1] for k in init} == set(counts)
    for key, m0 in init.items():
        m0, one_k, two_k = np.float64(m0), np.float64(got_one[key]), np.float64(got_two[key])
        if key[-1] == "mean":
            want = m0 + 1.9 * (one_k - m0)
        else:
            n = counts[key[:-1]]
            biased = (one_k - 0.9 * m0) / 0.1 * (n - 1) / n
            want = 0.81 * m0 + 0.19 * biased * (n / 2) / (n / 2 - 1)
        # float32 statistics; the variance is recovered through a division by 0.1
        np.testing.assert_allclose(two_k, want, rtol=2e-5, atol=1e-6, err_msg=str(key))


def test_batch_not_dividing_devices_is_a_clear_error():
    mesh = parallel.make_mesh(jax.devices()[:8])
    message = r"config.batch.labeled=12 must be a positive multiple of the number of devices \(8\)"
    with pytest.raises(ValueError, match=message):
        parallel.check_divisible(12, "config.batch.labeled", mesh)
    with pytest.raises(ValueError, match="not a multiple of 2"):
        parallel.check_divisible(8, "config.batch.labeled", mesh, multiple_of=2)
    assert parallel.check_divisible(16, "config.batch.labeled", mesh, multiple_of=2) == 2


@pytest.mark.parametrize("devices,labeled,group,accum,loss,error", [
    (8, 8, 8, 1, "ce", None),            # CSL Pascal: one image per device, a group over all 8
    (8, 16, 4, 1, "ce", None),           # two images per device, groups of 4 over device pairs
    (1, 8, 8, 2, "ce", "micro-batches of 4 image\\(s\\) per device \\(4 over 1"),  # group > micro-batch
    (8, 8, 3, 1, "ce", "config.loss.group_size=3 must divide one of them"),
    (8, 8, 2, 1, "ohem", "config.loss.labeled='ohem' needs whole loss groups on each device"),
    (8, 16, 2, 1, "ohem", None),
])
def test_loss_groups_must_be_whole(devices, labeled, group, accum, loss, error):
    config = tiny_config(group_size=group)
    config.batch.labeled, config.batch.accum_steps, config.loss.labeled = labeled, accum, loss
    method = build_method(config, NUM_CLASSES)
    mesh = parallel.make_mesh(jax.devices()[:devices])
    if error is None:
        train.check_loss_groups(config, method, mesh)
    else:
        with pytest.raises(ValueError, match=error):
            train.check_loss_groups(config, method, mesh)


def test_unknown_method_lists_valid_ones():
    config = tiny_config()
    config.method.name = "nope"
    with pytest.raises(ValueError, match=r"config.method.name='nope' is not a known method; valid: \[.*'supervised'"):
        build_method(config, NUM_CLASSES)


def test_poly_schedule_and_param_groups():
    cfg = ml_collections.ConfigDict(dict(lr=0.01, lr_multi=10.0, poly_power=0.9))
    lrs = optim.learning_rates(cfg, 100, jnp.asarray(30))
    np.testing.assert_allclose(float(lrs["lr"]), 0.01 * 0.7 ** 0.9, rtol=1e-6)
    np.testing.assert_allclose(float(lrs["lr_head"]), 0.1 * 0.7 ** 0.9, rtol=1e-6)
    labels = optim.param_groups({"backbone": {"w": 1}, "aspp": {"w": 2}})
    assert labels == {"backbone": {"w": "backbone"}, "aspp": {"w": "head"}}
