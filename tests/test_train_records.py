"""What a run records and returns across stops, a damaged checkpoint, resumes and a rerun: one
training run on the synthetic set, stopped twice (config.stop_after_steps, SIGTERM), then finished
and rerun; and the explicitly compiled train step."""

import json
import logging
import os
import signal
import time

import jax
import numpy as np
import optax
import pytest

from csl_jax import data, parallel, train
from csl_jax.methods import build_method
from tests.test_metrics_writer import tb_events
from tests.test_training_run import read_jsonl, tiny_config

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from data_prep import synthetic

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.prepare(root, num_train=32, num_val=4, image_size=(40, 40), seed=0)
    return str(root)


class Clock:
    """time.perf_counter, plus `offset` seconds."""

    def __init__(self):
        self.offset = 0.0

    def perf_counter(self):
        return time.perf_counter() + self.offset


def config_of(data_root, **overrides):
    """6 steps, a checkpoint every 3, evaluations at 4 and 6."""
    return tiny_config(data_root, **{"eval.every_steps": 4, **overrides})


def train_steps(workdir):
    return [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def test_stops_damaged_checkpoint_resume_and_rerun(data_root, tmp_path, monkeypatch, caplog):
    workdir = str(tmp_path / "run")
    final_path = os.path.join(workdir, "final_results.json")

    # 1. stop_after_steps=5: checkpoints 3 and 5, evaluation at 4, no final_results.json. Compiling
    #    (made to look 1000 s long) stays out of the first interval's steps/s.
    clock = Clock()
    compile_train_step = train.compile_train_step

    def slow_compile(train_step, state, batch):
        compiled, seconds = compile_train_step(train_step, state, batch)
        clock.offset += 1000.0
        return compiled, seconds + 1000.0

    monkeypatch.setattr(train, "time", clock)
    monkeypatch.setattr(train, "compile_train_step", slow_compile)
    with caplog.at_level(logging.INFO):
        out = train.train_and_evaluate(config_of(data_root, stop_after_steps=5), workdir)
    assert out == {"step": 5, "total_steps": 6, "finished": False, "stop_reason": "stop_after_steps"}
    assert not os.path.exists(final_path)
    messages = [r.getMessage() for r in caplog.records]
    assert "Compiling the train step ..." in messages
    assert any(m.startswith("Compiled the train step in ") and m.endswith(" s.") for m in messages)
    first = read_jsonl(os.path.join(workdir, "metrics.jsonl"))[0]
    assert first["step"] == 1 and first["steps_per_sec"] > 0.01  # 1 / 1000 if compiling were counted
    monkeypatch.undo()
    assert train_steps(workdir) == [1, 2, 3, 4, 5]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "5"]

    # 2. Checkpoint 5 is damaged: resume from 3 (5 moved aside), drop the records of steps 4 and 5,
    #    stop by Ctrl-C (SIGINT, which saves as SIGTERM does) during step 5.
    damaged = os.path.join(workdir, "checkpoints", "5")
    os.remove(os.path.join(damaged, "data", "metadata"))
    calls = []

    def compile_then_sigint_at_step_5(train_step, state, batch):
        compiled, seconds = compile_train_step(train_step, state, batch)

        def step(state, batch):
            calls.append(1)
            if len(calls) == 2:  # step 5 of 4, 5, ...
                os.kill(os.getpid(), signal.SIGINT)
            return compiled(state, batch)

        return step, seconds

    monkeypatch.setattr(train, "compile_train_step", compile_then_sigint_at_step_5)
    resumed_at = time.time()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = train.train_and_evaluate(config_of(data_root), workdir)
    monkeypatch.undo()
    assert out == {"step": 5, "total_steps": 6, "finished": False, "stop_reason": "SIGINT"}
    assert any(f"Checkpoint {damaged} is damaged (" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "5", "5.damaged"]
    assert not os.path.exists(final_path)
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert train_steps(workdir) == [1, 2, 3, 4, 5]  # each step once ...
    assert all(r["time"] > resumed_at for r in rows if r["step"] > 3)  # ... the later ones by this run
    assert [r["step"] for r in read_jsonl(os.path.join(workdir, "eval_results.jsonl"))] == [4]
    workdir_path = tmp_path / "run"
    events = tb_events(workdir_path)
    assert len(events) == 2
    starts = [e.step for e in events[1] if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [4]  # TensorBoard discards the first run's events of steps >= 4
    tags = {v.tag for e in events[1] for v in e.summary.value}
    assert {"train/loss", "train/lr", "train/steps_per_sec", "val/miou"} <= tags and "loss" not in tags

    # 3. To the end: final_results.json with the schedule, the last evaluation and per-class IoU.
    out = train.train_and_evaluate(config_of(data_root), workdir)
    with open(final_path) as f:
        saved = json.load(f)
    assert saved == out
    assert (out["step"], out["total_steps"], out["finished"]) == (6, 6, True) and "stop_reason" not in out
    assert 0.0 <= out["miou"] <= out["best_miou"] <= 1.0 and out["unit"] == "fraction"
    assert list(out["iou_per_class"]) == list(data.dataset_info(config_of(data_root).data).class_names)
    assert list(out["iou_per_class"].values()) == pytest.approx(out["iou"])
    assert train_steps(workdir) == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_jsonl(os.path.join(workdir, "eval_results.jsonl"))] == [4, 6]

    # 4. Rerun of the finished run: its results, without input streams or compiling.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was rerun")

    for name in ("make_streams", "make_train_step", "compile_train_step", "create_train_state"):
        monkeypatch.setattr(train, name, refuse)
    again = train.train_and_evaluate(config_of(data_root), workdir)
    assert again == dict(saved, already_finished=True)
    assert train_steps(workdir) == [1, 2, 3, 4, 5, 6]


def test_compiled_train_step_donates_and_matches_the_jitted_one(data_root):
    config = config_of(data_root)
    method = build_method(config, data.dataset_info(config.data).num_classes)
    mesh = parallel.make_mesh()
    tx = optax.sgd(0.01, momentum=0.9)
    train_step = train.make_train_step(method, tx, mesh, seed=0, steps_per_epoch=1,
                                       offsets=train.stream_offsets(method, config.batch))
    batch = parallel.to_global(train.make_streams(config, method).next(), mesh)

    def fresh_state():
        return parallel.replicate(train.create_train_state(method, tx, jax.random.PRNGKey(0), (32, 32, 3)), mesh)

    jitted_state, jitted_metrics = jax.device_get(train_step(fresh_state(), batch))
    state = fresh_state()
    compiled, seconds = train.compile_train_step(train_step, state, batch)
    new_state, metrics = compiled(state, batch)
    assert seconds > 0
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))  # donated
    for a, b in zip(jax.tree.leaves(jax.device_get((new_state, metrics))), jax.tree.leaves((jitted_state,
                                                                                             jitted_metrics))):
        np.testing.assert_array_equal(a, b)
    assert int(new_state.step) == 1
