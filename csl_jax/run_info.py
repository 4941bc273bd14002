"""What a run records about itself in its workdir (config, overrides, versions, commit) and says at its end."""

from __future__ import annotations

import datetime
import importlib.metadata
import itertools
import json
import os
import subprocess
import sys

import jax
import ml_collections
from absl import logging

from csl_jax import data, workdir as workdir_lib
from csl_jax.models import pretrained

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "ml-collections",
             "tensorflow-datasets", "csl_jax")


def package_versions() -> dict:
    """{package: version} of the packages that decide a run's numbers ('missing' when absent)."""
    versions = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def git_commit() -> str:
    """The commit of the csl_jax checkout (with '+dirty' for local changes), or 'unknown'."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def eval_records_folder(workdir: str, mode: str, output: str | None = None) -> str | None:
    """The folder --mode=eval/predict (`mode`) records itself in (runs/) and saves eval_*.json to:
    `workdir` when it can be written, else `output` (predict's), else None: nothing is written. They
    never modify a run folder they cannot write; a one-line warning says where the record goes instead."""
    if not any(workdir_lib.folder_problem(folder) for folder in (workdir, os.path.join(workdir, "runs"))):
        return workdir
    instead = f"records this invocation in {os.path.join(output, 'runs')}" if output else (
        "saves no record and no eval_*.json (the results are printed only)")
    logging.warning("%s is not writable: --mode=%s leaves it unchanged and %s.", workdir, mode, instead)
    return output


def prepare(config: ml_collections.ConfigDict, workdir: str, mode: str) -> str | None:
    """Records this invocation in `workdir` (for eval and predict: `eval_records_folder`) (process 0
    only); returns the record's path (None elsewhere).

    A fresh training run (no checkpoint or best model in `workdir` yet) writes config.json, the
    run's config, and run_train.json (with 'init', the initial weights: `pretrained.init_record`); every
    later invocation (a resume, eval, predict) writes runs/<mode>_<UTC time>.json with its resolved
    config and leaves those two alone. A record holds
    the mode, argv, overrides, start time, package versions, git commit, devices and the data
    (`data.dataset_record`: the prepared dataset's fingerprint and builder settings, e.g.
    how COCO's masks were made). (The data is prepared by `csl_jax.data.ensure_prepared` before.)
    """
    if jax.process_index() != 0:
        return None
    os.makedirs(workdir, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    info = {
        "mode": mode,
        "argv": sys.argv,
        "overrides": [a for a in sys.argv[1:] if a.startswith("--config.")],
        "started": now.isoformat(timespec="seconds"),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "data": data.dataset_record(config.data),
    }
    if mode == "train" and not workdir_lib.has_trained_state(workdir):
        info["init"] = pretrained.init_record(pretrained.resolve_init(config.model))  # the weights of step 0
        config_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
        if os.path.exists(config_path):
            logging.warning("Replacing %s of an earlier run that saved no checkpoint.", config_path)
        with open(config_path, "w") as f:
            f.write(workdir_lib.config_to_json(config))
        path = os.path.join(workdir, "run_train.json")
        with open(path, "w") as f:
            json.dump(info, f, indent=1)
        return path
    os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
    stem = os.path.join(workdir, "runs", f"{mode}_{now.strftime('%Y%m%dT%H%M%SZ')}")
    info["config"] = json.loads(workdir_lib.config_to_json(config))
    for attempt in itertools.count():  # two invocations in one second: _1, _2, ...
        path = f"{stem}.json" if attempt == 0 else f"{stem}_{attempt}.json"
        try:
            with open(path, "x") as f:
                json.dump(info, f, indent=1)
            return path
        except FileExistsError:
            continue


def withdraw(record: str, remove_folder: bool) -> None:
    """Removes the record `prepare` wrote for an eval/predict that then failed, and its runs/ folder when
    `remove_folder` (the invocation made it), so a failed evaluation leaves the run folder as it was."""
    os.remove(record)
    if remove_folder and not os.listdir(os.path.dirname(record)):
        os.rmdir(os.path.dirname(record))


def initial_weights(workdir: str) -> dict | None:
    """The weights the run in `workdir` started from (run_train.json's 'init', `pretrained.init_record`), or None."""
    path = os.path.join(workdir, "run_train.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("init")


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def summary(results: dict, workdir: str) -> str:
    """The line main.py prints at the end of --mode=train.

    results: `csl_jax.train.train_and_evaluate`'s dict: 'step' (last step done), 'total_steps',
    'finished' (bool), 'already_finished' (the run had ended before this invocation), 'stop_reason'
    ('SIGTERM', 'SIGINT' or 'stop_after_steps' when stopped early) and, after an evaluation, 'miou' and
    'best_miou' (fractions).
    """
    step, total = results["step"], results["total_steps"]
    miou, best = _percent(results.get("miou")), _percent(results.get("best_miou"))
    if results.get("already_finished"):
        return f"{workdir} already finished (step {step}/{total}): val mIoU {miou}, best {best}"
    if results["finished"]:
        return f"finished: step {step}/{total}, val mIoU {miou} (best {best}); see {workdir}"
    reason = f" ({results['stop_reason']})" if results.get("stop_reason") else ""
    return f"stopped at step {step} of {total}{reason}; resume with the same command"
