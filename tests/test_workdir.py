"""The workdir as the record of a run (csl_jax.workdir, csl_jax.run_info): config.json round trip,
resume and evaluation configs, the lock, the per-invocation records and the end-of-run line."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from configs import common, demo
from csl_jax import run_info
from csl_jax import workdir as workdir_lib
from csl_jax.workdir import WorkdirLock, WorkdirLockedError


def _typed(value):
    """A config's values with their types: {'lr': ('float', 0.02), 'rates': ('tuple', [('int', 6), ...])}."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value).__name__, [_typed(v) for v in value]
    return type(value).__name__, value


@pytest.mark.parametrize("config", [
    demo.get_config(), demo.get_config("csl"), common.get_recipe("cityscapes", "1_16", "unimatch"),
    common.get_recipe("pascal", "1464", "supervised")], ids=["demo", "demo_csl", "unimatch_city", "sup_pascal"])
def test_config_json_round_trips_types(tmp_path, config):
    config.data.class_names = ("a", "b")
    path = tmp_path / "config.json"
    path.write_text(workdir_lib.config_to_json(config))
    loaded = workdir_lib.load_config(str(path))
    assert _typed(loaded.to_dict()) == _typed(config.to_dict())
    assert loaded.model.aspp_rates == config.model.aspp_rates and isinstance(loaded.model.aspp_rates, tuple)
    with pytest.raises(AttributeError):  # locked like the --config flag's
        loaded.optim.learning_rate = 0.1


def test_load_config_names_a_broken_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"^{path} is not valid JSON"):
        workdir_lib.load_config(str(path))


def _save(workdir, config, steps=(3,)):
    os.makedirs(workdir, exist_ok=True)
    for step in steps:
        os.makedirs(os.path.join(workdir, "checkpoints", str(step)))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(workdir_lib.config_to_json(config))


def test_resume_keeps_the_recipe(tmp_path):
    saved = demo.get_config("csl")
    now = demo.get_config("csl")
    now.data.root, now.data.num_workers, now.data.prefetch = "/elsewhere", 3, 7  # where/how fast: free
    now.model.init_from = "/weights/r50.pth"  # read at step 0 only: free
    now.eval.every_steps, now.stop_after_steps, now.log_every_steps = 10, 20, 5  # not the recipe: free
    now.checkpoint_every_steps = 7
    assert workdir_lib.resume_differences(saved, now) == []
    now.model.aspp_rates, now.data.split, now.method.tau = (1, 2, 3), "1_8", 0.5
    now.optim.total_steps, now.batch.accum_steps, now.loss.group_size, now.seed = 900, 2, 4, 1
    assert workdir_lib.resume_differences(saved, now) == [
        "config.batch.accum_steps: saved 1, now 2",
        "config.data.split: saved '1_4', now '1_8'",
        "config.loss.group_size: saved 8, now 4",
        "config.method.tau: saved 0.95, now 0.5",
        "config.model.aspp_rates: saved (2, 4, 6), now (1, 2, 3)",
        "config.optim.total_steps: saved 300, now 900",
        "config.seed: saved 0, now 1"]
    workdir = str(tmp_path / "run")
    _save(workdir, saved, steps=())
    workdir_lib.check_resume(workdir, now)  # nothing trained yet: a fresh run
    os.makedirs(os.path.join(workdir, "checkpoints", "150"))
    with pytest.raises(ValueError, match=r"holds a run started with another recipe; resuming it would change:\n"
                                         r"  config.batch.accum_steps: saved 1, now 2\n"):
        workdir_lib.check_resume(workdir, now)
    renamed = demo.get_config("csl")
    renamed.method.name, renamed.batch.labeled = "unimatch", 16
    assert workdir_lib.resume_differences(saved, renamed) == [  # the method name first
        "config.method.name: saved 'csl', now 'unimatch'", "config.batch.labeled: saved 8, now 16"]
    for _ in range(10):  # a long list is cut
        now.model[f"extra_{_}"] = _
    with pytest.raises(ValueError, match=r"\n  \.\.\. and 5 more\nResume with the saved settings"):
        workdir_lib.check_resume(workdir, now)


def test_resume_of_a_run_saved_before_a_field_existed_reads_its_later_default():
    """optim.lr_after_step and U2PL's class_pairing were added later: a config.json without them ran
    False and 'intended'; a resume with those values is accepted, another value is named."""
    from configs import u2pl_camvid

    saved, now = u2pl_camvid.get_config("1_8,intended"), u2pl_camvid.get_config("1_8,intended")
    for key in ("class_pairing", "queue_write", "labeled_repeat", "variant"):
        del saved.method[key]
    del saved.optim["lr_after_step"]
    now.method.labeled_repeat = "tile"
    assert workdir_lib.resume_differences(saved, now) == []  # method.variant: a label, absent before
    now.optim.lr_after_step, now.method.class_pairing = True, "reference"
    del saved.model["kernels"]  # a run from before the train-time kernels ran the plain formulations
    assert workdir_lib.resume_differences(saved, now) == [
        "config.method.class_pairing: saved (absent: 'intended'), now 'reference'",
        "config.model.kernels: saved (absent: 'reference'), now 'fast'",
        "config.optim.lr_after_step: saved (absent: False), now True"]


def test_resume_names_keys_one_config_lacks():
    saved, now = demo.get_config(), demo.get_config()
    now.model.extra_width = 4
    assert workdir_lib.resume_differences(saved, now) == ["config.model.extra_width: saved (absent), now 4"]


def test_evaluation_config_takes_only_evaluation_and_data_reading_overrides(tmp_path):
    saved = demo.get_config()
    saved.eval.protocol = "sliding"
    workdir = str(tmp_path / "run")
    _save(workdir, saved)
    config = workdir_lib.evaluation_config(workdir_lib.saved_config(workdir),
                                           {"eval.batch_size": 2, "data.root": "/moved"}, workdir, "eval")
    assert (config.eval.batch_size, config.data.root) == (2, "/moved")
    assert config.eval.protocol == "sliding" and config.optim.total_steps == 300  # the saved run's
    with pytest.raises(ValueError, match=r"takes only --config.eval.\* and .* overrides, not --config.model.depth, "
                                         r"--config.optim.lr$"):
        workdir_lib.evaluation_config(workdir_lib.saved_config(workdir),
                                      {"optim.lr": 0.1, "eval.batch_size": 2, "model.depth": 101}, workdir, "predict")


# --- the lock ----------------------------------------------------------------------------------


def test_lock_is_held_released_and_refuses_a_live_holder(tmp_path):
    workdir = str(tmp_path / "run")
    lock = WorkdirLock.acquire(workdir)
    holder = json.load(open(os.path.join(workdir, ".lock")))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
    with pytest.raises(WorkdirLockedError, match=f"in use by another training run \\(pid {os.getpid()} on host "):
        WorkdirLock.acquire(workdir)
    lock.release()
    lock.release()  # idempotent
    assert os.listdir(workdir) == []
    WorkdirLock.acquire(workdir).release()


def test_lock_of_another_process_refuses_until_it_is_gone(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import time; from csl_jax.workdir import WorkdirLock; "
                               f"WorkdirLock.acquire({workdir!r}); print('locked', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLockedError, match=f"\\(pid {holder.pid} on host "):
            WorkdirLock.acquire(workdir)
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING):
        lock = WorkdirLock.acquire(workdir)  # the killed holder left a stale lock
    assert f"Replacing the stale lock {workdir}/.lock of pid {holder.pid}" in caplog.text
    assert json.load(open(os.path.join(workdir, ".lock")))["pid"] == os.getpid()
    lock.release()


def test_lock_of_another_host_or_unreadable_is_not_replaced(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / ".lock").write_text(json.dumps({"pid": 1, "host": "node-7", "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(WorkdirLockedError, match=r"\(pid 1 on host node-7, started 2026-01-01T00:00:00\+00:00\)"):
        WorkdirLock.acquire(str(workdir))
    (workdir / ".lock").write_text("")
    with pytest.raises(WorkdirLockedError, match="which is unreadable; if no training run uses this workdir"):
        WorkdirLock.acquire(str(workdir))
    assert sorted(os.listdir(workdir)) == [".lock"]


# --- the records -------------------------------------------------------------------------------


def test_only_a_fresh_training_run_writes_config_json(tmp_path):
    workdir = str(tmp_path / "run")
    config = demo.get_config()
    assert run_info.prepare(config, workdir, "train") == os.path.join(workdir, "run_train.json")
    saved = {name: open(os.path.join(workdir, name)).read() for name in ("config.json", "run_train.json")}
    assert json.loads(saved["run_train.json"])["mode"] == "train"
    os.makedirs(os.path.join(workdir, "best", "150"))  # the run saved a model

    other = demo.get_config()
    other.eval.batch_size = 2
    records = [run_info.prepare(other, workdir, mode) for mode in ("eval", "eval", "predict", "train")]
    for name, text in saved.items():
        assert open(os.path.join(workdir, name)).read() == text, name
    assert len(set(records)) == 4 and all(os.path.dirname(r) == os.path.join(workdir, "runs") for r in records)
    assert [os.path.basename(r).split("_")[0] for r in records] == ["eval", "eval", "predict", "train"]
    record = json.load(open(records[0]))
    assert record["mode"] == "eval" and record["config"]["eval"]["batch_size"] == 2 and record["versions"]["jax"]


def test_a_training_run_that_saved_nothing_is_replaced(tmp_path):
    workdir = str(tmp_path / "run")
    run_info.prepare(demo.get_config(), workdir, "train")
    config = demo.get_config()
    config.data.crop_size = 48
    run_info.prepare(config, workdir, "train")
    assert workdir_lib.saved_config(workdir).data.crop_size == 48
    assert sorted(os.listdir(workdir)) == ["config.json", "run_train.json"]


# --- the last line of a run --------------------------------------------------------------------


def test_summary_of_a_finished_stopped_and_already_finished_run():
    results = {"miou": 0.5891, "best_miou": 0.6012, "step": 300, "total_steps": 300, "finished": True}
    assert run_info.summary(results, "runs/demo") == (
        "finished: step 300/300, val mIoU 58.91 (best 60.12); see runs/demo")
    assert run_info.summary(dict(results, already_finished=True), "runs/demo") == (
        "runs/demo already finished (step 300/300): val mIoU 58.91, best 60.12")
    stopped = {"step": 161, "total_steps": 300, "finished": False}
    assert run_info.summary(dict(stopped, stop_reason="SIGTERM"), "runs/demo") == (
        "stopped at step 161 of 300 (SIGTERM); resume with the same command")
    assert run_info.summary(dict(stopped, stop_reason="stop_after_steps", miou=0.4), "runs/demo") == (
        "stopped at step 161 of 300 (stop_after_steps); resume with the same command")
