"""main.py's command line: every mistake is one line on stderr and exit code 2, before anything is
written; --mode=config; the settings checks of csl_jax.config_checks; refusals on an existing workdir."""

import json
import os
import socket
import subprocess
import sys

import pytest

from configs import common, demo
from csl_jax import config_checks
from csl_jax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(args, timeout=120):
    """(exit code, stdout, stderr) of `python main.py ARGS` on one CPU device."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def assert_usage_error(args, *expected):
    """main.py ARGS exits 2 with one `error: ...` line on stderr (its last) containing each of `expected`."""
    code, out, err = run_main(args)
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert lines and lines[-1].startswith("error: ") and len(lines) <= 2, err
    for text in expected:
        assert text in lines[-1], (text, lines[-1])
    assert out == ""
    return lines[-1]


DEMO = "--config=configs/demo.py"


@pytest.mark.parametrize("args, expected", [
    ([], ["error: --config=FILE is required, e.g. python main.py --config=configs/demo.py --workdir=runs/demo"]),
    ([DEMO, "--wrokdir=x"], ["error: unknown flag --wrokdir (did you mean --workdir?); main.py's flags: --config, "
                             "--workdir, --mode"]),
    ([DEMO, "WORKDIR", "--config.optim.lr=abc"],
     ["--config.optim.lr=abc: could not convert string to float: 'abc' (config.optim.lr: type float, e.g. 0.02)"]),
    (["--config=configs/nope.py", "WORKDIR"], ["--config=configs/nope.py: no such file 'configs/nope.py'"]),
    ([DEMO, "WORKDIR", "--config.optim.learning_rate=0.1"], ["config.optim has no key 'learning_rate'", "'lr'"]),
    ([DEMO, "WORKDIR", "--mode=bogus"], ["--mode=bogus: value should be one of <train|eval|predict|config>"]),
    (["--config=configs/demo.py:bogus", "WORKDIR"],
     ["--config=configs/demo.py:bogus: get_config raised ValueError: config.method.name='bogus' has no"]),
    ([DEMO, "WORKDIR", "extra"], ["unexpected arguments ['extra']"]),
    ([DEMO], ["--mode=train needs --workdir=DIR"]),
    ([DEMO, "WORKDIR", "--mode=predict"], ["--mode=predict needs --input=FOLDER"]),
    ([DEMO, "WORKDIR", "--config.optim.total_steps=-5"], ["config.optim.total_steps=-5: must be an int >= 0"]),
    ([DEMO, "WORKDIR", "--config.checkpoint_every_steps=0"], ["config.checkpoint_every_steps=0: must be an int > 0"]),
    ([DEMO, "WORKDIR", "--config.model.dtype=float16"], ["config.model.dtype='float16': must be one of"]),
    ([DEMO, "WORKDIR", "--mode=eval"], ["--checkpoint=best: no best model in"]),
    ([DEMO, "WORKDIR", "--mode=eval", "--checkpoint=nope.pth"], ["--checkpoint=nope.pth: no such file"]),
])
def test_command_line_mistakes_are_one_line_and_exit_2(tmp_path, args, expected):
    workdir = tmp_path / "run"
    assert_usage_error([f"--workdir={workdir}" if a == "WORKDIR" else a for a in args], *expected)
    assert not workdir.exists()  # refused before anything is written


def test_method_name_contradicting_the_config_fails_clearly(tmp_path):
    workdir = tmp_path / "run"
    assert_usage_error(
        ["--config=configs/unimatch_pascal.py", f"--workdir={workdir}", "--config.method.name=fixmatch"],
        "error: config.method.name='fixmatch', but the other config.method options are those of the 'unimatch' "
        "preset (second_view='cutmix', use_fp=True;",
        "also set --config.method.second_view=none --config.method.use_fp=False")
    assert not workdir.exists()


def test_mode_config_prints_the_resolved_config_and_touches_no_workdir(tmp_path):
    workdir = tmp_path / "run"
    code, out, err = run_main([DEMO, "--mode=config", "--config.optim.lr=0.5", "--config.model.aspp_rates=(1, 2, 3)"])
    assert code == 0, err
    printed = json.loads(out)
    assert printed["optim"]["lr"] == 0.5 and printed["model"]["aspp_rates"] == [1, 2, 3]
    assert printed["data"]["name"] == "synthetic"
    code, out, err = run_main([DEMO, f"--workdir={workdir}", "--mode=config"])
    assert code == 0 and json.loads(out)["optim"]["lr"] == 0.02, err
    assert not workdir.exists()


def _saved_run(workdir, with_checkpoint=True):
    """A workdir as a demo training run leaves it: config.json and (an empty stand-in of) checkpoints/150/."""
    os.makedirs(workdir / "checkpoints" / "150" if with_checkpoint else workdir)
    text = workdir_lib.config_to_json(demo.get_config())
    (workdir / "config.json").write_text(text)
    return text


def test_resume_with_another_model_or_data_config_is_refused(tmp_path):
    workdir = tmp_path / "run"
    saved = _saved_run(workdir)
    line = assert_usage_error(
        [DEMO, f"--workdir={workdir}", "--config.model.dtype=bfloat16", "--config.data.crop_size=48",
         "--config.data.num_workers=2", "--config.optim.total_steps=600"],
        f"{workdir} holds a run of another model/data/method config",
        "config.data.crop_size: saved 64, now 48; config.model.dtype: saved 'float32', now 'bfloat16'.")
    assert "num_workers" not in line and "total_steps" not in line
    assert (workdir / "config.json").read_text() == saved
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json"]  # no record, and the lock released


def test_eval_takes_only_evaluation_overrides_of_the_saved_config(tmp_path):
    workdir = tmp_path / "run"
    saved = _saved_run(workdir)
    assert_usage_error(
        [DEMO, f"--workdir={workdir}", "--mode=eval", "--config.optim.lr=0.1", "--config.model.dtype=bfloat16",
         "--config.eval.batch_size=2"],
        f"--mode=eval runs on the run's own config {workdir}/config.json, so it takes only --config.eval.* and "
        "--config.{data.root,data.num_workers,data.num_threads,data.prefetch} overrides, not "
        "--config.model.dtype, --config.optim.lr")
    # Without --config, eval runs on the saved config (here: no best model yet).
    assert_usage_error([f"--workdir={workdir}", "--mode=eval"], f"--checkpoint=best: no best model in {workdir}/best")
    assert (workdir / "config.json").read_text() == saved


def test_a_second_training_run_into_a_workdir_is_refused(tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from csl_jax.workdir import WorkdirLock; "
         f"WorkdirLock.acquire({str(workdir)!r}); print('locked', flush=True); time.sleep(120)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = (workdir / ".lock").read_text()
        assert_usage_error(
            [DEMO, f"--workdir={workdir}"],
            f"{workdir} is in use by another training run (pid {holder.pid} on host {socket.gethostname()}, started ",
            f"delete {workdir}/.lock")
        assert (workdir / ".lock").read_text() == lock
    finally:
        holder.kill()
        holder.wait()


# --- csl_jax.config_checks -------------------------------------------------------------------


@pytest.mark.parametrize("key, value, message", [
    ("optim.total_steps", -5, "config.optim.total_steps=-5: must be an int >= 0"),
    ("optim.lr", 0.0, "config.optim.lr=0.0: must be > 0"),
    ("log_every_steps", 0, "config.log_every_steps=0: must be an int > 0"),
    ("checkpoint_every_steps", 0, "config.checkpoint_every_steps=0: must be an int > 0"),
    ("keep_checkpoints", 0, "config.keep_checkpoints=0: must be an int >= 1"),
    ("stop_after_steps", -1, "config.stop_after_steps=-1: must be an int >= 0"),
    ("eval.every_steps", -1, "config.eval.every_steps=-1: must be an int >= 0"),
    ("batch.labeled", 0, "config.batch.labeled=0: must be an int > 0"),
    ("batch.unlabeled", -8, "config.batch.unlabeled=-8: must be an int > 0"),
    ("batch.accum_steps", 0, "config.batch.accum_steps=0: must be an int >= 1"),
    ("loss.group_size", 0, "config.loss.group_size=0: must be an int >= 1"),
    ("data.crop_size", 0, "config.data.crop_size=0: must be an int > 0"),
    ("model.dtype", "float16", "config.model.dtype='float16': must be one of ['bfloat16', 'float32']"),
    ("model.aspp_rates", ("a",), "config.model.aspp_rates=('a',): must be a tuple of positive ints"),
    ("eval.protocol", "tiles", "config.eval.protocol='tiles': must be one of ['center_crop', 'sliding', "),
    ("eval.evaluations", ":sliding", "config.eval.evaluations=':sliding': entry ':sliding' names no predict "
                                     "function; expected PREDICT[@SPLIT][:PROTOCOL]"),
    ("eval.evaluations", "model,teacher:tiles", "config.eval.evaluations='model,teacher:tiles': entry "
                                                "'teacher:tiles' names protocol 'tiles'; valid: "),
    ("eval.evaluations", "model@train", "entry 'model@train' names split 'train'; valid: ['val', 'test']"),
    ("eval.evaluations", ",", "config.eval.evaluations=',': must be comma-separated PREDICT[@SPLIT][:PROTOCOL]"),
])
def test_config_checks_name_the_key_the_value_and_what_is_valid(key, value, message):
    config = demo.get_config()
    section, _, leaf = key.rpartition(".")
    (config[section] if section else config)[leaf] = value
    with pytest.raises(ValueError) as error:
        config_checks.check(config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_config_checks_epochs_only_matter_without_total_steps():
    config = demo.get_config()
    config.optim.epochs = 0
    config_checks.check(config)  # total_steps=300 decides
    config.optim.total_steps = 0
    with pytest.raises(ValueError, match=r"^config.optim.epochs=0: must be > 0 when optim.total_steps=0"):
        config_checks.check(config)


@pytest.mark.parametrize("name", ["supervised", "csl", "unimatch", "fixmatch"])
def test_config_checks_pass_the_shipped_recipes(name):
    config_checks.check(demo.get_config(name))
    for dataset, split in (("pascal", "1464"), ("cityscapes", "1_16"), ("camvid", "1_8")):
        config_checks.check(common.get_recipe(dataset, split, name))


def test_bad_input_found_while_running_is_one_line(tmp_path):
    """A wrong split name surfaces inside training (data sources), not in flag parsing: exit 1, one line."""
    code, out, err = run_main(["--config=configs/demo.py", f"--workdir={tmp_path / 'run'}",
                               f"--config.data.root={tmp_path / 'data'}", "--config.data.synthetic.num_train=8",
                               "--config.data.synthetic.num_val=2", "--config.data.split=1_3"], timeout=300)
    lines = err.strip().splitlines()
    assert code == 1, (code, out, err[-2000:])
    assert lines[-1] == "error: unknown synthetic split '1_3'; valid: 1_2, 1_4, 1_8", err[-2000:]
    assert "Traceback" not in err
