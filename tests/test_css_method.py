"""CSS's method plumbing: the teacher EMA against `Model_cross.ema_update`, the ramp-down epoch in both
units, option checks, and two steps on the synthetic set (the loss decomposition, the zero cross-space loss
at T_r = 0.5, the teacher's own BN statistics, prototypes set for present classes only)."""

import re

import jax
import ml_collections
import numpy as np
import optax
import pytest

from configs import css_camvid
from csl_jax import train
from csl_jax.methods import build_method
from csl_jax.methods.base import StepContext
from tests.helpers import harness

data_root = harness.data_root


def tiny_config(root=None, **method):
    return harness.tiny_method_config(harness.tiny_css, root, total_steps=400, **method)


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
    harness.assert_refuses_another_model_and_unequal_batches(tiny_config)


def test_camvid_variants_select_the_reference_and_the_intended_behaviour():
    ref, intended = css_camvid.get_config("1_8"), css_camvid.get_config("1_8,intended")
    assert (ref.method.rep_temp, ref.method.rampdown_unit) == (0.5, "labeled_epochs")
    assert (intended.method.rep_temp, intended.method.rampdown_unit) == (0.1, "run")
    assert (ref.method.variant, intended.method.variant) == ("css", "css_intended")  # the report's row names
    assert ref.optim.total_steps == 240 * (321 // 8) and ref.optim.min_lr == 1e-4 and ref.optim.nesterov
    with pytest.raises(ValueError, match="variant"):
        css_camvid.get_config("1_8,other")


def test_two_steps_state_and_metrics(data_root):
    config = tiny_config(data_root)
    method = build_method(config, 5)
    streams = train.make_streams(config, method)
    stepper = harness.Stepper(config, method, 2, tx=optax.sgd(0.01))
    t_stats0 = stepper.initial.state["teacher"]["batch_stats"]["head"]["project_1"]["mean"]
    for _ in range(2):
        batch = streams.next()
        m = stepper.step(batch)
        np.testing.assert_allclose(m["loss"], m["loss_sup"] + m["loss_u"] + m["rampdown"] * m["loss_c"], rtol=1e-5)
        # T_r = 0.5: conf_rep <= e^2 / (e^2 + 4 e^-2) = 0.93 < 0.97 with 5 classes, so L_u is exactly 0
        assert m["loss_u"] == 0.0 and m["cross_space_keep"] == 0.0 and m["image_weight"] == 0.0
        assert m["loss_c"] > 0 and 0 < m["anchor_fraction"] <= 1
    ts = stepper.host()
    state = ts.state
    assert not np.allclose(state["teacher"]["batch_stats"]["head"]["project_1"]["mean"], t_stats0)
    present = np.isin(np.arange(5), np.concatenate([np.unique(batch["labeled"]["label"])]))
    assert (np.abs(state["prototypes"]).sum(1)[present] > 0).all()  # labeled classes always contribute
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(ts.params))


def test_benchmark_cost_model_counts_css_passes():
    from benchmarks import train_step

    opts = tiny_config().method
    # teacher: no-grad train passes on x and u (B_l + B_u); student: train passes on x and u~ (3 (B_l + B_u))
    assert train_step.forward_passes(opts, 8, 8, 0.3) == 4.0 * 16
    assert train_step.METHOD_CONFIGS["css"].get_config().method.name == "css"
