"""Whole runs on the synthetic set: SIGTERM, NaN stop, the demo through main.py (stop, resume, eval), a bad split.

Exact resume of every method is in tests/test_method_contract.py."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import common, demo
from csl_jax import checkpoint, train
from tests.helpers import harness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

data_root = harness.data_root


def tiny_config(data_root, method="supervised", **overrides):
    c = demo.get_config(method)
    c.data.root = data_root
    c.data.crop_size = 32
    c.data.split = "1_2"
    common.tiny_model(c, width=4, head_width=8, reduce_width=4)
    c.batch.labeled = 16
    c.batch.unlabeled = 16
    c.data.block_size = 8
    c.log_every_steps = 1
    c.checkpoint_every_steps = 3
    c.eval.every_steps = 100
    c.eval.batch_size = 8
    c.optim.total_steps = 6
    return harness.set_fields(c, overrides)


def final_state(workdir):
    state, data_state, step = checkpoint.Checkpointer(workdir).restore(None)
    return jax.device_get(state), data_state, step


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_csl_reliable_pseudo_labels_are_more_accurate(data_root, tmp_path):
    workdir = str(tmp_path / "csl")
    config = tiny_config(data_root, "csl", **{"optim.total_steps": 60, "data.crop_size": 40, "model.width": 8,
                                              "model.head_width": 16, "model.reduce_width": 8})
    train.train_and_evaluate(config, workdir)
    metrics = [m for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "pl_acc" in m and m["step"] > 30]
    reliable = np.mean([m["pl_acc_reliable"] for m in metrics])
    rest = np.mean([m["pl_acc_rest"] for m in metrics])
    assert 0.0 < np.mean([m["mask_ratio"] for m in metrics]) < 1.0
    assert reliable > rest + 0.05, (reliable, rest)
    for key in ("loss", "loss_x", "loss_s", "loss_m", "loss_fp", "lr", "lr_head", "grad_norm", "steps_per_sec",
                "data_wait", "eta_seconds"):
        assert all(np.isfinite(m[key]) for m in metrics), key


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path):
    workdir = str(tmp_path / "nan")
    train.train_and_evaluate(tiny_config(data_root, stop_after_steps=3), workdir)
    kept = re.escape(f"at step 5; stopped. The checkpoint of step 3 is kept ({workdir}/checkpoints); lower optim.lr")
    with pytest.raises(train.NonFiniteLossError, match=kept):
        train.train_and_evaluate(tiny_config(data_root, **{"optim.lr": 1e30}), workdir)
    assert checkpoint.Checkpointer(workdir).latest_step() == 3


def test_nan_loss_of_a_fresh_run_is_one_line_saying_no_checkpoint_exists(data_root, tmp_path):
    workdir = tmp_path / "nan"
    proc = run_main(["--config=configs/demo.py", f"--workdir={workdir}", f"--config.data.root={data_root}",
                     "--config.data.crop_size=32", "--config.data.synthetic.num_train=32",
                     "--config.data.synthetic.num_val=4", "--config.data.synthetic.image_size=(40, 40)",
                     "--config.optim.lr=1e30", "--config.log_every_steps=1"])
    out, _ = proc.communicate(timeout=600)
    lines = out.strip().splitlines()
    assert proc.returncode == 1, out
    assert re.fullmatch(r"error: loss became (nan|inf|-inf) at step [12]; stopped. No checkpoint was written before "
                        r"it; lower optim.lr or check the data", lines[-1]), lines[-1]
    assert "Traceback" not in out
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


def test_a_second_ctrl_c_aborts_at_once():
    """The first SIGINT is remembered (the loop saves and stops, as for SIGTERM); the second raises."""
    before = signal.getsignal(signal.SIGINT)
    with train._Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.reason == "SIGINT"  # the first signal names the stop
    assert signal.getsignal(signal.SIGINT) is before  # restored after the loop


def test_bad_split_name_lists_valid_ones(data_root, tmp_path):
    # The whole message: the wrong name, then every split the prepared synthetic set has.
    message = "unknown synthetic split '1_3'; valid: 1_2, 1_4, 1_8"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        train.train_and_evaluate(tiny_config(data_root, **{"data.split": "1_3"}), str(tmp_path / "bad"))


def run_main(args, **kwargs):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_demo_sigterm_then_resume_to_the_end(data_root, tmp_path):
    workdir = str(tmp_path / "demo")
    args = ["--config=configs/demo.py", f"--workdir={workdir}", f"--config.data.root={data_root}",
            "--config.data.crop_size=32", "--config.data.synthetic.num_train=32", "--config.data.synthetic.num_val=4",
            "--config.data.synthetic.image_size=(40, 40)", "--config.optim.total_steps=200",
            "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=100000", "--config.eval.every_steps=100000"]
    proc = run_main(args)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "training did not start in 300 s"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    stopped_at = checkpoint.Checkpointer(workdir).latest_step()
    assert stopped_at is not None and stopped_at >= 1
    assert f"stopped at step {stopped_at} of 200 (SIGTERM); resume with the same command" in out
    assert not os.path.exists(os.path.join(workdir, ".lock"))
    records = {name: open(os.path.join(workdir, name)).read() for name in ("config.json", "run_train.json")}

    # The same run (the same recipe), resumed to its end: metrics, checkpoint, evaluation and a plot.
    end = 200
    proc = run_main(args[:-3] + ["--config.log_every_steps=50", "--config.eval.every_steps=1000"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert f"Resumed from {workdir} at step {stopped_at}" in out
    assert checkpoint.Checkpointer(workdir).latest_step() == end
    logged = [r["step"] for r in read_jsonl(metrics) if "loss" in r and r["step"] > stopped_at]
    assert logged[0] == stopped_at + 1 and logged[-1] == end  # the first step of the invocation and the end ...
    assert all(step % 50 == 0 for step in logged[1:-1]) and len(logged) >= 3  # ... and every 50th
    results = json.load(open(os.path.join(workdir, "final_results.json")))
    assert 0.0 <= results["miou"] <= 1.0 and results["protocol"]["name"] == "whole"
    assert any(f.endswith(".png") for f in os.listdir(os.path.join(workdir, "plots")))
    assert f"finished: step {end}/{end}, val mIoU {100 * results['miou']:.2f}" in out

    # eval on the workdir's own config (no --config); the records of the run stay as they were.
    proc = run_main([f"--workdir={workdir}", "--mode=eval"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert json.load(open(os.path.join(workdir, "eval_best.json")))["split"] == "val"
    for name, text in records.items():
        assert open(os.path.join(workdir, name)).read() == text, name
    assert sorted(name.split("_")[0] for name in os.listdir(os.path.join(workdir, "runs"))) == ["eval", "train"]
