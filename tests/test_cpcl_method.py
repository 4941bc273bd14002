"""One CPCL step, wired as the official exp_voc / exp_city train.py: per branch the train-mode passes
x -> u0 -> u1 -> x_mix (BN statistics chained), teacher logits mixed with the 3-box mask, and the
unlabeled losses of the float64 transcription in tests/test_cpcl_losses.py on those logits (the
default config: leofansq/CPCL at HEAD f0e1800; `,first_commit`: 0bf0c50); L_inter reaches branch 1
only, L_union branch 2 only; option errors name their key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common, cpcl_camvid, cpcl_cityscapes
from csl_jax import parallel
from csl_jax.methods import StepContext, build_method, check_config
from csl_jax.models import build_model
from tests.helpers import harness
from tests.test_cpcl_losses import FIRST, HEAD, nchw, reference_unsup

data_root = harness.data_root

NUM_CLASSES = 5
B, CROP = 4, 33


def tiny_config(arg="1_8", **method):
    c = cpcl_camvid.get_config(arg)
    common.tiny_model(c, width=4, head_width=8, reduce_width=4)
    c.loss.group_size = B
    c.method.update(method)
    return c


def batch(seed=0):
    rng = np.random.default_rng(seed)

    def images():
        return rng.standard_normal((B, CROP, CROP, 3)).astype(np.float32)

    label = rng.integers(0, NUM_CLASSES, size=(B, CROP, CROP)).astype(np.int32)
    ignore = np.zeros((B, CROP, CROP), np.int32)
    return {"labeled": {"image": images(), "label": label},
            "unlabeled": {"weak": images(), "ignore": ignore, "label": label * 0 + 255,
                          "cpcl_mask": rng.random((B, CROP, CROP)) < 0.4},
            "mix": {"weak": images(), "ignore": ignore, "label": label * 0 + 255}}


def run_loss(method, params, state, data, grad_of=None):
    """(loss, (state, metrics)) on one device inside shard_map; with `grad_of`, the gradient of that metric."""
    offsets = {"labeled": 0, "unlabeled": B, "mix": 2 * B}

    def per_device(params, state, data):
        ctx = StepContext(rng=jax.random.PRNGKey(0), step=jnp.int32(0), device_index=jnp.int32(0), num_devices=1,
                          steps_per_epoch=1, stream_offsets=offsets)
        if grad_of is None:
            return method.loss(params, state, data, ctx)
        return jax.grad(lambda p: method.loss(p, state, data, ctx)[1][1][grad_of])(params)

    fn = harness.sharded(per_device, 1, in_specs=(P(), P(), P(parallel.AXIS)))
    return jax.device_get(fn(params, state, parallel.to_global(data, harness.mesh(1))))


@pytest.mark.parametrize("arg,commit", [("1_8", HEAD), ("1_8,first_commit", FIRST)])
def test_one_step_matches_the_reference_wiring(arg, commit):
    """The recipe's own options, unchanged: the default is HEAD's exp_voc, `,first_commit` 0bf0c50's."""
    method = build_method(tiny_config(arg), NUM_CLASSES)
    params, state = method.init(jax.random.PRNGKey(0), (CROP, CROP, 3))
    data = batch()
    loss, (new_state, metrics) = run_loss(method, params, state, data)

    u0, u1, m = data["unlabeled"]["weak"], data["mix"]["weak"], data["unlabeled"]["cpcl_mask"][..., None]
    x_mix = u0 * (1 - m) + u1 * m  # the reference's mixing in normalised space
    logits, stats = {}, {}
    plain = build_model(method.config.model, NUM_CLASSES)  # plain BN: one device holds the whole batch
    for b in ("branch1", "branch2"):
        net, chained = getattr(plain, b), state["batch_stats"][b]
        for key, x in (("x", data["labeled"]["image"]), ("u0", u0), ("u1", u1), ("x_mix", x_mix)):
            (logits[b, key], _), upd = net.apply({"params": params[b], "batch_stats": chained}, x, train=True,
                                                 mutable=["batch_stats"])
            chained = upd["batch_stats"]
        stats[b] = chained
    tea = [np.asarray(logits[b, "u0"]) * (1 - m) + np.asarray(logits[b, "u1"]) * m for b in ("branch1", "branch2")]
    ref = reference_unsup(nchw(tea[0]), nchw(tea[1]), nchw(logits["branch1", "x_mix"]),
                          nchw(logits["branch2", "x_mix"]), commit, "exp_voc")
    np.testing.assert_allclose(metrics["loss_inter"], ref["loss_inter"], rtol=1e-4)
    np.testing.assert_allclose(metrics["loss_union"], ref["loss_union"], rtol=1e-4)
    np.testing.assert_allclose(metrics["overlap"], ref["overlap"], rtol=1e-5)
    np.testing.assert_allclose([metrics["conf1"], metrics["conf2"]], [ref["c1"].mean(), ref["c2"].mean()], rtol=1e-5)
    np.testing.assert_allclose(loss, metrics["loss_sup"] + metrics["loss_inter"] + metrics["loss_union"], rtol=1e-6)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(new_state["batch_stats"]),
                                 jax.tree.leaves(stats)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_each_unlabeled_loss_reaches_one_branch():
    method = build_method(tiny_config(), NUM_CLASSES)
    params, state = method.init(jax.random.PRNGKey(0), (CROP, CROP, 3))
    for metric, trained, untouched in (("loss_inter", "branch1", "branch2"), ("loss_union", "branch2", "branch1")):
        grads = run_loss(method, params, state, batch(1), grad_of=metric)
        assert all(np.all(g == 0) for g in jax.tree.leaves(grads[untouched])), metric
        assert sum(float(np.abs(g).sum()) for g in jax.tree.leaves(grads[trained])) > 0, metric


def test_a_config_saved_with_the_old_defaults_still_loads():
    """Before HEAD's defaults: confidence='reference' (now also 'first_commit'), 'valid_mean', no variant."""
    c = tiny_config(confidence="reference", unsup_reduction="valid_mean")
    del c.method["variant"]
    check_config(c)
    assert build_method(c, NUM_CLASSES).opts.confidence == "reference"


def test_options_are_checked_by_name():
    for key, value, match in (("confidence", "max", "config.method.confidence"),
                              ("unsup_reduction", "sum", "config.method.unsup_reduction"),
                              ("unsup_weight", -1.0, "config.method.unsup_weight")):
        c = tiny_config(**{key: value})
        with pytest.raises(ValueError, match=match):
            check_config(c)
    c = tiny_config()
    del c.method["mask_padding"]
    with pytest.raises(ValueError, match="config.method.mask_padding is missing"):
        check_config(c)
    c = tiny_config()
    c.loss.labeled = "ohem"
    with pytest.raises(ValueError, match="config.loss.labeled='ohem'"):
        build_method(c, NUM_CLASSES)
    with pytest.raises(ValueError, match="19 values for 5 classes"):
        build_method(cpcl_cityscapes.get_config("1_8"), NUM_CLASSES)


def test_weighted_ohem_over_the_global_batch_one_device_equals_eight(data_root):
    """The Cityscapes loss setting: class-weighted OHEM with one group = the global batch of 16, spread over
    8 devices (exact min_kept-th probability by psum'd bisection), and 'pixel_mean' unlabeled losses."""
    overrides = {"loss.labeled": "ohem_weighted", "loss.group_size": 16, "loss.ohem_min_kept": 4000,
                 "method.unsup_reduction": "pixel_mean", "method.unsup_weight": 5.0}
    config = harness.contract_config(data_root, "cpcl", **overrides)
    config.method.class_weights = (0.8, 1.2, 0.9, 1.1, 1.0)
    method = build_method(config, harness.NUM_CLASSES)
    batches = harness.first_batches(config, method, 1)
    one = harness.run_steps(config, method, batches, 1)
    eight = harness.run_steps(config, method, batches, 8)
    np.testing.assert_allclose(eight.losses, one.losses, rtol=1e-5)
    harness.assert_trees_close(eight.params, one.params, rtol=1e-4, atol=5e-5)
