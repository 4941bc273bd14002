"""benchmarks/train_run.py --tiny: two real main.py runs, checked against their own workdir files."""
import contextlib
import io
import json
import math
import os

import jax
import numpy as np
import pytest

from benchmarks import train_run

DTYPES = ("float32", "bfloat16")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(report, stdout, out path) of one `--tiny` run. The main.py subprocesses get one CPU device."""
    jax.devices()  # initialise this process's backend (conftest's 8 devices) before the env changes
    out = tmp_path_factory.mktemp("train_run") / "train_run.json"
    buffer = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buffer):
        mp.setenv("JAX_PLATFORMS", "cpu")
        mp.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
        report = train_run.main(["--tiny", "--out", str(out)])
    return report, buffer.getvalue(), out


def _train_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "loss" in r]


def test_report_matches_workdir_files(tiny):
    report, _, _ = tiny
    assert report["tiny"] and report["steps"] == 6 and report["workers"] == 0 and report["devices"] == 1
    assert set(report["runs"]) == set(DTYPES)
    for dtype in DTYPES:
        run = report["runs"][dtype]
        assert run["workdir"] == os.path.join(report["workdir_root"], dtype)
        assert f"--config.model.dtype={dtype}" in run["command"]
        rows = _train_rows(run["workdir"])
        assert [r["step"] for r in rows] == [1, 2, 4, 6]  # the trainer logs the first step on its own
        assert run["loss_curve"] == [[r["step"], r["loss"]] for r in rows]
        assert run["final_loss"] == rows[-1]["loss"]
        assert all(math.isfinite(loss) for _, loss in run["loss_curve"])
        waits = np.array([r["data_wait"] for r in rows])
        assert run["data_wait_share"] == pytest.approx(np.mean(waits[1:]))
        assert run["data_wait_share_all"] == pytest.approx(np.mean(waits))
        assert 0 <= run["data_wait_share"] <= 1 and 0 <= run["data_wait_share_all"] <= 1
        assert run["steps_per_sec"] == pytest.approx(np.mean([r["steps_per_sec"] for r in rows[1:]]))
        assert run["first_window_s"] == pytest.approx(1 / rows[0]["steps_per_sec"])
        assert 0 < run["first_window_s"] < run["wall_s"]
        with open(os.path.join(run["workdir"], "final_results.json")) as f:
            assert run["val_miou"] == json.load(f)["miou"]
        assert 0 <= run["val_miou"] <= 1
        with open(os.path.join(run["workdir"], "config.json")) as f:
            config = json.load(f)
        assert config["model"]["dtype"] == dtype and config["seed"] == 0
        assert config["optim"]["total_steps"] == 6 and config["data"]["num_workers"] == 0
        assert config["model"]["width"] == 8 and config["data"]["crop_size"] == 64  # the demo's tiny model


def test_comparison_recomputed(tiny):
    report, _, _ = tiny
    a = dict(map(tuple, report["runs"]["float32"]["loss_curve"]))
    b = dict(map(tuple, report["runs"]["bfloat16"]["loss_curve"]))
    steps = sorted(set(a) & set(b))
    diffs = np.array([abs(b[s] - a[s]) for s in steps])
    c = report["comparison"]
    assert c["steps"] == len(steps) == 4
    assert c["max_abs_loss_diff"] == pytest.approx(diffs.max())
    assert c["mean_rel_loss_diff"] == pytest.approx(np.mean(diffs / np.abs([a[s] for s in steps])))


def test_json_and_table(tiny):
    report, stdout, out = tiny
    with open(out) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    lines = stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["step", "float32", "loss"])
    assert [line.split()[0] for line in lines[header + 1:header + 5]] == ["1", "2", "4", "6"]
    assert lines[header + 5].split(":")[0].strip() == "float32"
    assert lines[header + 6].split(":")[0].strip() == "bfloat16"
    assert lines[-1].startswith("bfloat16 vs float32")
    assert lines[header - 1].startswith("device: cpu")
    assert report["device"].startswith("cpu")


def test_failing_run_names_its_workdir(tiny, tmp_path):
    report, _, _ = tiny
    argv = ["--tiny", "--dtype", "float32", "--out", str(tmp_path / "bad.json"),
            "--data-root", report["dataset"]["root"], "--extra-override", "optim.lr=notanumber"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_PLATFORMS", "cpu")
        mp.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
        with pytest.raises(RuntimeError) as error:
            train_run.main(argv)
    message = str(error.value)
    assert os.path.join(str(tmp_path / "bad_work"), "float32") in message
    assert "notanumber" in message and "stderr tail" in message
    assert not (tmp_path / "bad.json").exists()
