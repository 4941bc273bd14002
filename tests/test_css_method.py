"""CSS's method plumbing: the teacher EMA against `Model_cross.ema_update`, the ramp-down epoch in both
units, option checks, and two steps on the synthetic set (the loss decomposition, the zero cross-space loss
at T_r = 0.5, the teacher's own BN statistics, prototypes set for present classes only)."""

import re

import jax
import ml_collections
import numpy as np
import optax
import pytest

from configs import common, css_camvid, demo
from csl_jax import parallel, train
from csl_jax.methods import build_method, css
from csl_jax.methods.base import StepContext
from data_prep import synthetic


def tiny_config(root=None, **method):
    c = css.configure(demo.get_config("supervised"))
    common.tiny_model(c, width=4, head_width=8, reduce_width=4)
    c.model.rep_dim = 8
    c.data.update(crop_size=32, split="1_2")
    if root:
        c.data.root = root
    c.batch.update(labeled=4, unlabeled=4)
    c.optim.total_steps = 400
    c.method.update({"num_queries": 16, "num_negatives": 8, **method})
    return c


def test_teacher_is_the_reference_ema_of_the_params_only():
    method = build_method(tiny_config(), 5)
    teacher, student_stats = {"w": np.float32(-1.0)}, {"m": np.float32(3.0)}
    state = {"teacher": {"params": teacher, "batch_stats": student_stats}}
    ref = -1.0
    for step, s in enumerate([2.0, 5.0, 7.0, 11.0] + [13.0] * 200):
        state = method.after_update(state, {"w": np.float32(s)}, np.int32(step))
        d = min(1 - 1 / (step + 1), 0.99)  # Model_cross.ema_update: self.step counts the updates done
        ref = d * ref + (1 - d) * s
        np.testing.assert_allclose(float(state["teacher"]["params"]["w"]), ref, rtol=1e-5)
    assert state["teacher"]["batch_stats"] is student_stats


def test_rampdown_epoch_units():
    ctx = StepContext(rng=jax.random.PRNGKey(0), step=np.int32(57), device_index=np.int32(0), num_devices=1,
                      steps_per_epoch=5, stream_offsets={})
    assert float(build_method(tiny_config(), 5).rampdown_epoch(ctx)) == 11.0  # floor(57 / 5) labeled epochs
    run = build_method(tiny_config(rampdown_unit="run"), 5)
    np.testing.assert_allclose(float(run.rampdown_epoch(ctx)), 200 * 57 / 400, rtol=1e-6)


@pytest.mark.parametrize("key,value", [("rampdown_unit", "steps"), ("rep_temp", 0.0), ("un_threshold", 1.5),
                                       ("num_negatives", 0), ("warmup_epochs", -1),
                                       ("num_queries", 2.5), ("labeled_rescale", "yes")])
def test_bad_options_are_refused_by_name(key, value):
    config = tiny_config()
    config.method = ml_collections.ConfigDict({**config.method.to_dict(), key: value})  # e.g. a config.json typo
    with pytest.raises(ValueError, match="^" + re.escape(f"config.method.{key}={value!r}")):
        build_method(config, 5)


def test_refuses_another_model_and_unequal_batches():
    c = tiny_config()
    c.model.name = "deeplabv3plus"
    with pytest.raises(ValueError, match="config.model.name"):
        build_method(c, 5)
    c = tiny_config()
    c.batch.unlabeled = 8
    with pytest.raises(ValueError, match="config.batch.labeled"):
        build_method(c, 5)


def test_camvid_variants_select_the_reference_and_the_intended_behaviour():
    ref, intended = css_camvid.get_config("1_8"), css_camvid.get_config("1_8,intended")
    assert (ref.method.rep_temp, ref.method.rampdown_unit) == (0.5, "labeled_epochs")
    assert (intended.method.rep_temp, intended.method.rampdown_unit) == (0.1, "run")
    assert (ref.method.variant, intended.method.variant) == ("css", "css_intended")  # the report's row names
    assert ref.optim.total_steps == 240 * (321 // 8) and ref.optim.min_lr == 1e-4 and ref.optim.nesterov
    with pytest.raises(ValueError, match="variant"):
        css_camvid.get_config("1_8,other")


def test_two_steps_state_and_metrics(tmp_path):
    synthetic.prepare(tmp_path, num_train=32, num_val=4, image_size=(40, 40), seed=0)
    config = tiny_config(str(tmp_path))
    method = build_method(config, 5)
    streams = train.make_streams(config, method)
    mesh = parallel.make_mesh(jax.devices()[:2])
    tx = optax.sgd(0.01)
    ts = train.create_train_state(method, tx, jax.random.PRNGKey(0), (32, 32, 3))
    t_stats0 = np.array(ts.state["teacher"]["batch_stats"]["head"]["project_1"]["mean"])
    ts = parallel.replicate(ts, mesh)
    step = train.make_train_step(method, tx, mesh, seed=0, steps_per_epoch=1,
                                 offsets=train.stream_offsets(method, config.batch))
    for _ in range(2):
        batch = streams.next()
        ts, m = step(ts, parallel.to_global(batch, mesh))
        m = jax.device_get(m)
        np.testing.assert_allclose(m["loss"], m["loss_sup"] + m["loss_u"] + m["rampdown"] * m["loss_c"], rtol=1e-5)
        # T_r = 0.5: conf_rep <= e^2 / (e^2 + 4 e^-2) = 0.93 < 0.97 with 5 classes, so L_u is exactly 0
        assert m["loss_u"] == 0.0 and m["cross_space_keep"] == 0.0 and m["image_weight"] == 0.0
        assert m["loss_c"] > 0 and 0 < m["anchor_fraction"] <= 1
    state = jax.device_get(ts.state)
    assert not np.allclose(state["teacher"]["batch_stats"]["head"]["project_1"]["mean"], t_stats0)
    present = np.isin(np.arange(5), np.concatenate([np.unique(batch["labeled"]["label"])]))
    assert (np.abs(state["prototypes"]).sum(1)[present] > 0).all()  # labeled classes always contribute
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(ts.params)))


def test_benchmark_cost_model_counts_css_passes():
    from benchmarks import train_step

    opts = tiny_config().method
    # teacher: no-grad train passes on x and u (B_l + B_u); student: train passes on x and u~ (3 (B_l + B_u))
    assert train_step.forward_passes(opts, 8, 8, 0.3) == 4.0 * 16
    assert train_step.METHOD_CONFIGS["css"].get_config().method.name == "css"
