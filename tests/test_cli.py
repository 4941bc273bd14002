"""main.py's command line: every mistake is one line on stderr and exit code 2, before anything is
written; --mode=config; the settings checks of csl_jax.config_checks; refusals on an existing workdir."""

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import common, demo
from csl_jax import config_checks
from csl_jax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(args, timeout=120, devices=1, prefix=()):
    """(exit code, stdout, stderr) of `python main.py ARGS` on `devices` CPU devices, run by the command `prefix`."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([*prefix, sys.executable, "main.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def assert_usage_error(args, *expected, prefix=()):
    """main.py ARGS exits 2 with one `error: ...` line on stderr (its last) containing each of `expected`."""
    code, out, err = run_main(args, prefix=prefix)
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
    ([DEMO, "WORKDIR", "--config.model.backbone=vgg16"],
     ["config.model.backbone='vgg16': must be one of ['resnet', 'xception65']"]),
    ([DEMO, "WORKDIR", "--mode=eval"], ["--checkpoint=best: no best model in"]),
    ([DEMO, "WORKDIR", "--mode=eval", "--checkpoint=nope.pth"], ["--checkpoint=nope.pth: no such file"]),
    (["--config=configs/u2pl_cityscapes.py:1_16", "--mode=config"],
     ["error: config.data.split='1_16': must be a cityscapes_u2pl split: 1488, 186, 372, 744"]),
    (["--config=configs/u2pl_pascal.py:1_3", "WORKDIR"], ["config.data.split='1_3': must be a pascal split: 1464,"]),
    (["--config=configs/ccvc_pascal.py:1464", "--mode=config", "--config.method.confidence=prob",
      "--config.method.tau=1.5"], ["config.method.tau=1.5 must be in [0, 1] with confidence='prob'"]),
    (["--config=configs/cpcl_pascal.py:1_8", "--mode=config", "--config.method.class_weights=abc"],
     ["config.method.class_weights=('abc',) must be a tuple of numbers > 0, one per class"]),
    (["--config=configs/csl_pascal.py:1464", "--mode=config", "--config.method.tau=1.5"],
     ["config.method.tau=1.5 must be in [0, 1]"]),
    (["--config=configs/csl_cityscapes.py:1_8", "WORKDIR", "--config.method.ema_momentum=1.0"],
     ["config.method.ema_momentum=1.0 must be in [0, 1)"]),
    (["--config=configs/css_pascal.py:1464", "--mode=config", "--config.method.rep_temp=0"],
     ["config.method.rep_temp=0.0 must be > 0"]),
])
def test_command_line_mistakes_are_one_line_and_exit_2(tmp_path, args, expected):
    workdir = tmp_path / "run"
    assert_usage_error([f"--workdir={workdir}" if a == "WORKDIR" else a for a in args], *expected)
    assert not workdir.exists()  # refused before anything is written


@pytest.mark.parametrize("override, expected", [
    ("--config.batch.labeled=6", "config.batch.labeled=6 must be a positive multiple of the number of devices (4)"),
    ("--config.loss.group_size=3", "config.loss.group_size=3 must divide one of them"),
])
def test_batches_that_do_not_split_over_the_devices_are_refused_before_anything_is_written(tmp_path, override,
                                                                                        expected):
    workdir = tmp_path / "run"
    code, out, err = run_main([DEMO, f"--workdir={workdir}", f"--config.data.root={tmp_path / 'data'}", override],
                              devices=4)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and expected in lines[-1], err
    assert not workdir.exists()


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


def test_resume_with_another_recipe_is_refused_one_key_per_line(tmp_path):
    """A resume may not change the recipe (model, data, method, optim, batch, loss, seed): exit 2, a
    first line, the differing keys one per line, nothing written."""
    workdir = tmp_path / "run"
    saved = _saved_run(workdir)
    code, out, err = run_main(
        [DEMO, f"--workdir={workdir}", "--config.model.dtype=bfloat16", "--config.data.crop_size=48",
         "--config.data.num_workers=2", "--config.optim.lr=0.5", "--config.seed=3",
         "--config.stop_after_steps=20", "--config.eval.every_steps=10"])
    assert code == 2 and out == "", err
    lines = err.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert lines[start:] == [
        f"error: {workdir} holds a run started with another recipe; resuming it would change:",
        "  config.data.crop_size: saved 64, now 48",
        "  config.model.dtype: saved 'float32', now 'bfloat16'",
        "  config.optim.lr: saved 0.02, now 0.5",
        "  config.seed: saved 0, now 3",
        f"Resume with the saved settings ({workdir}/config.json) or train in a new --workdir"]
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
    ("model.kernels", "fused", "config.model.kernels='fused': must be one of ['fast', 'reference']"),
    ("eval.protocol", "tiles", "config.eval.protocol='tiles': must be one of ['center_crop', 'sliding', "),
    ("eval.evaluations", ":sliding", "config.eval.evaluations=':sliding': entry ':sliding' names no predict "
                                     "function; expected PREDICT[@SPLIT][:PROTOCOL]"),
    ("eval.evaluations", "model,teacher:tiles", "config.eval.evaluations='model,teacher:tiles': entry "
                                                "'teacher:tiles' names protocol 'tiles'; valid: "),
    ("eval.evaluations", "model@train", "entry 'model@train' names split 'train'; valid: ['val', 'test']"),
    ("eval.evaluations", ",", "config.eval.evaluations=',': must be comma-separated PREDICT[@SPLIT][:PROTOCOL]"),
    ("optim.name", "adam", "config.optim.name='adam': must be one of ['sgd', 'adamw']"),
    ("data.epoch_samples", -1, "config.data.epoch_samples=-1: must be an int >= 0"),
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
    for dataset, split in (("pascal", "1464"), ("cityscapes", "1_16"), ("camvid", "1_8"), ("coco", "1_512"),
                           ("ade20k", "1_64")):
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


# --- the folders of a run: paths that cannot be folders, read-only folders, damaged checkpoints ------------


def tree(folder):
    """{path relative to `folder`: the file's bytes, or None for a folder} of everything under `folder`."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@contextlib.contextmanager
def read_only(folder):
    """Yields the command prefix under which main.py finds `folder` read-only. As root, whom file modes do
    not stop, a read-only bind mount in a new mount namespace (skips where none can be made); as another
    user, the write bits of everything in `folder` taken off while the block runs."""
    if os.geteuid() == 0:
        prefix = ["unshare", "--mount", "sh", "-c",
                  'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"', str(folder)]
        if not shutil.which("unshare") or subprocess.run([*prefix, "true"], capture_output=True).returncode:
            pytest.skip("root, and no read-only bind mount can be made here (unshare --mount)")
        yield prefix
        return
    modes = {path: path.stat().st_mode for path in [folder, *folder.rglob("*")]}
    for path, mode in modes.items():
        path.chmod(mode & ~0o222)
    try:
        yield []
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def warnings(err):
    """The messages of the absl warning lines of `err`."""
    return [line.split("] ", 1)[1] for line in err.splitlines() if line.startswith("W")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """ROOT/run: a tiny demo run trained by main.py for 2 steps at crop 32 (checkpoints/1, checkpoints/2,
    best/2); ROOT/images/a.png to predict."""
    root = tmp_path_factory.mktemp("finished")
    code, out, err = run_main(
        [DEMO, f"--workdir={root / 'run'}", f"--config.data.root={root / 'data'}", "--config.data.split=1_2",
         "--config.data.synthetic.num_train=8", "--config.data.synthetic.num_val=2",
         "--config.data.synthetic.image_size=(32, 32)", "--config.data.crop_size=32", "--config.model.width=4",
         "--config.model.head_width=8", "--config.model.reduce_width=4", "--config.batch.labeled=2",
         "--config.batch.unlabeled=2", "--config.optim.total_steps=2", "--config.checkpoint_every_steps=1",
         "--config.eval.every_steps=2", f"--config.compilation_cache_dir={root / 'xla'}"], timeout=600)
    assert code == 0, err[-2000:]
    assert workdir_lib.checkpoint_steps(root / "run", "checkpoints") == [1, 2]
    assert workdir_lib.checkpoint_steps(root / "run", "best") == [2]
    (root / "images").mkdir()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / "images" / "a.png")
    return root / "run"


@pytest.mark.parametrize("args, flag, advice", [
    ([DEMO, "--workdir=FILE"], "--workdir=FILE", ""),
    ([DEMO, "--workdir=FILE/sub"], "--workdir=FILE/sub", ""),
    (["--workdir=FILE", "--mode=eval"], "--workdir=FILE", ""),
    (["--workdir=RUN", "--mode=predict", "--checkpoint=latest", "--input=IMAGES", "--output=FILE/masks"],
     "--output=FILE/masks", "; give --output=FOLDER, a folder to write the predictions into"),
])
def test_a_workdir_or_output_where_a_file_is_is_one_line(tmp_path, args, flag, advice):
    """--workdir or predict's --output naming a file, or a folder inside one: exit 2, one line, nothing written."""
    paths = {"FILE": tmp_path / "file", "RUN": tmp_path / "run", "IMAGES": tmp_path / "images"}
    paths["FILE"].write_text("not a folder")
    paths["IMAGES"].mkdir()
    _saved_run(paths["RUN"])
    before = tree(tmp_path)

    def resolved(arg):
        for name, path in paths.items():
            arg = arg.replace(name, str(path))
        return arg

    line = assert_usage_error([resolved(arg) for arg in args])
    assert line == f"error: {resolved(flag)}: {paths['FILE']} is a file, not a folder{advice}"
    assert tree(tmp_path) == before


@pytest.mark.parametrize("mode", ["train", "predict"])
def test_a_read_only_workdir_to_train_or_output_to_predict_is_one_line(tmp_path, mode):
    """Training into (a new folder in) a read-only folder, predicting into one: exit 2, one line, nothing written."""
    locked, run, images = tmp_path / "locked", tmp_path / "run", tmp_path / "images"
    locked.mkdir()
    images.mkdir()
    _saved_run(run)
    before = tree(tmp_path)
    args, flag, advice = {
        "train": ([DEMO, f"--workdir={locked / 'new'}"], f"--workdir={locked / 'new'}", ""),
        "predict": ([f"--workdir={run}", "--mode=predict", "--checkpoint=latest", f"--input={images}",
                     f"--output={locked}"], f"--output={locked}",
                    "; give --output=FOLDER, a folder to write the predictions into")}[mode]
    with read_only(locked) as prefix:
        line = assert_usage_error(args, prefix=prefix)
    assert line == f"error: {flag}: {locked} is not writable{advice}"
    assert tree(tmp_path) == before


def test_eval_and_predict_never_modify_a_read_only_workdir(finished_run, tmp_path):
    """eval and predict on a run folder they cannot write: eval saves nothing, predict records itself in
    --output and refuses the default output inside the run; one warning line each; the folder unchanged."""
    workdir, images, out = finished_run, finished_run.parent / "images", tmp_path / "out"
    before = tree(workdir)
    with read_only(workdir) as prefix:
        code, stdout, err = run_main([f"--workdir={workdir}", "--mode=eval"], prefix=prefix)
        assert code == 0 and "Traceback" not in err, err
        assert re.fullmatch(rf"val mIoU [\d.]+ \(model, whole\) from best checkpoint of {workdir} \(step 2, "
                            r"mIoU [\d.]+, model\)\n", stdout), stdout
        assert warnings(err) == [f"{workdir} is not writable: --mode=eval leaves it unchanged and saves no record "
                                 "and no eval_*.json (the results are printed only)."]

        predict = [f"--workdir={workdir}", "--mode=predict", f"--input={images}"]
        line = assert_usage_error(predict, prefix=prefix)
        assert line == (f"error: --output={workdir}/predictions (the default): {workdir} is not writable; give "
                        "--output=FOLDER, a folder to write the predictions into")

        code, stdout, err = run_main([*predict, f"--output={out}"], prefix=prefix)
        assert code == 0 and "Traceback" not in err, err
        assert stdout.startswith(f"wrote predictions of 1 image(s) by best checkpoint of {workdir} (step 2, mIoU "
                                 ) and stdout.endswith(
            f"to {out}\n"), stdout
        assert warnings(err) == [f"{workdir} is not writable: --mode=predict leaves it unchanged and records this "
                                 f"invocation in {out}/runs."]
    assert tree(workdir) == before
    assert sorted(os.listdir(out)) == ["a_color.png", "a_mask.png", "a_overlay.png", "runs"]
    assert [name.startswith("predict_") for name in os.listdir(out / "runs")] == [True]


@pytest.mark.parametrize("which, what, damaged", [("best", "best checkpoint", "best/2"),
                                                  ("latest", "train-state checkpoint", "checkpoints/2")])
def test_a_damaged_checkpoint_at_eval_is_one_error_naming_it(finished_run, tmp_path, which, what, damaged):
    """A truncated array file in the best or the latest checkpoint: exit 1, one line naming it; no fallback
    to checkpoints/1, nothing renamed or created, and the failed eval leaves no record (runs/eval_*.json)."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    array = sorted((workdir / damaged).glob("*/d/*"))[0]
    array.write_bytes(array.read_bytes()[: array.stat().st_size // 2])
    before = tree(workdir)
    code, out, err = run_main([f"--workdir={workdir}", "--mode=eval", f"--checkpoint={which}"])
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and "Traceback" not in err, err
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
    assert lines[-1].startswith(f"error: the {what} {workdir / damaged} cannot be read ("), lines[-1]
    assert lines[-1].endswith("). A file is missing or truncated (a crash or a full disk while saving?); nothing "
                              "was changed."), lines[-1]
    assert tree(workdir) == before
