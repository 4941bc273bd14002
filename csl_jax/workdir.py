"""A workdir as the record of one training run: its saved config, its trained state, its lock.

    WORKDIR/config.json          the run's resolved config, written by the fresh training run only
    WORKDIR/checkpoints/<step>/  train states; WORKDIR/best/<step>/ the best model (csl_jax.checkpoint)
    WORKDIR/.lock                held by the training run in progress: {"pid", "host", "started"}

A resume must keep the recipe of config.json, fixed when the run started (`check_resume`): model,
data, method, optimiser, batch, loss and seed settings; what a resume may change is RUNTIME_KEYS,
RESUME_FREE and everything outside RESUME_KEPT (stop_after_steps, eval.*, logging and checkpoint
intervals, the compilation cache). A key that config.json lacks because the field was added later
counts as the value that reproduces the older run (`later_defaults`). Eval and predict run on
config.json with only evaluation and data-reading settings changed (`evaluation_config`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket

import ml_collections
from absl import logging

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
#: Settings of where and how fast data is read, not of what is read: a resume, eval or predict may change them.
RUNTIME_KEYS = ("data.root", "data.num_workers", "data.num_threads", "data.prefetch")
#: Prefixes (and whole keys) of the recipe settings a resume must keep (besides RUNTIME_KEYS and RESUME_FREE).
RESUME_KEPT = ("model.", "data.", "method.", "optim.", "batch.", "loss.", "seed")
#: model.init_from is only read at step 0 (the checkpoint holds the weights); method.variant is a label
#: (the report's row) whose settings are compared field by field: a resume may change them.
RESUME_FREE = ("model.init_from", "method.variant")
#: At most this many differing keys are listed by a refused resume.
_MAX_LISTED = 12


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The JSON text of config.json (tuples as lists; `load_config` turns them back into tuples)."""
    return config.to_json_best_effort(indent=1)


def _tuples(value):
    """JSON value -> config value: lists become tuples (configs hold tuples, never lists)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def load_config(path: str) -> ml_collections.ConfigDict:
    """The locked ConfigDict of a config.json; ints, floats, strings, bools, None and tuples round-trip."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); it should hold a run's config") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not a run's config (an object)")
    config = ml_collections.ConfigDict(_tuples(raw))
    config.lock()
    return config


def saved_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The run's config from WORKDIR/config.json, or None when the workdir has none."""
    path = os.path.join(workdir, CONFIG_FILE)
    return load_config(path) if os.path.exists(path) else None


def checkpoint_steps(workdir: str, kind: str) -> list[int]:
    """Sorted steps of the complete saves under WORKDIR/<kind> ('checkpoints' or 'best'); [] when none."""
    folder = os.path.join(workdir, kind)
    if not os.path.isdir(folder):
        return []
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def has_trained_state(workdir: str) -> bool:
    """Whether the workdir holds a train-state checkpoint or a best model (a run to resume or evaluate)."""
    return bool(checkpoint_steps(workdir, "checkpoints") or checkpoint_steps(workdir, "best"))


def flatten(config: ml_collections.ConfigDict) -> dict:
    """{'model.dtype': 'float32', ...}: the leaves of `config` as config.json holds them (tuples as tuples)."""
    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(walk(_tuples(json.loads(config_to_json(config))), ""))


def later_defaults(config: ml_collections.ConfigDict) -> dict:
    """{'optim.min_lr': 0.0, 'method.pad_label': 255, ...}: for the fields added after a run could have
    been saved, the value that reproduces it (csl_jax.optim.LATER_FIELDS, csl_jax.models.registry.LATER_FIELDS,
    csl_jax.data.pipeline.LATER_FIELDS, the method's `later_fields`)."""
    from csl_jax import optim
    from csl_jax.data import pipeline
    from csl_jax.methods import METHODS
    from csl_jax.models import registry

    method = METHODS.get(config.get("method", {}).get("name"))
    return {**{f"optim.{k}": v for k, v in optim.LATER_FIELDS.items()},
            **{f"data.{k}": v for k, v in pipeline.LATER_FIELDS.items()},
            **{f"model.{k}": v for k, v in registry.LATER_FIELDS.items()},
            **{f"method.{k}": v for k, v in (method.later_fields if method else {}).items()}}


def _kept(key: str) -> bool:
    return key.startswith(RESUME_KEPT) and key not in RUNTIME_KEYS + RESUME_FREE


def resume_differences(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
    """'config.KEY: saved X, now Y' for every recipe setting a resume may not change, config.method.name
    first. A key the saved config lacks counts as its `later_defaults` value (shown as '(absent: X)')."""
    old, new, later = flatten(saved), flatten(config), later_defaults(saved)
    absent = object()

    def saved_value(key):
        return old.get(key, later.get(key, absent))

    def show(value, filled: bool = False) -> str:
        if value is absent:
            return "(absent)"
        return f"(absent: {value!r})" if filled else repr(value)

    keys = sorted((k for k in set(old) | set(new) if _kept(k) and saved_value(k) != new.get(k, absent)),
                  key=lambda k: (k != "method.name", k))
    return [f"config.{k}: saved {show(saved_value(k), k not in old)}, now {show(new.get(k, absent))}" for k in keys]


def check_resume(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError when `workdir` holds a trained run whose config.json differs from `config` in a
    recipe setting (`resume_differences`): a first line, then one differing key per line."""
    saved = saved_config(workdir)
    if saved is None or not has_trained_state(workdir):
        return
    differences = resume_differences(saved, config)
    if differences:
        listed = differences[:_MAX_LISTED]
        if len(differences) > _MAX_LISTED:
            listed.append(f"... and {len(differences) - _MAX_LISTED} more")
        saved_path = os.path.join(workdir, CONFIG_FILE)
        raise ValueError(f"{workdir} holds a run started with another recipe; resuming it would change:\n  "
                         + "\n  ".join(listed) + f"\nResume with the saved settings ({saved_path}) or train in a "
                         "new --workdir")


def evaluation_config(saved: ml_collections.ConfigDict, overrides: dict, workdir: str,
                      mode: str) -> ml_collections.ConfigDict:
    """`saved` (the run's config.json) with the `overrides` ({'eval.batch_size': 4, ...}) of
    evaluation settings (`config.eval.*`) and RUNTIME_KEYS; raises ValueError naming any other."""
    refused = sorted(key for key in overrides if not (key.startswith("eval.") or key in RUNTIME_KEYS))
    if refused:
        raise ValueError(f"--mode={mode} runs on the run's own config {os.path.join(workdir, CONFIG_FILE)}, so it "
                         f"takes only --config.eval.* and --config.{{{','.join(RUNTIME_KEYS)}}} overrides, not "
                         + ", ".join(f"--config.{key}" for key in refused))
    with saved.unlocked():
        return set_fields(saved, overrides)


def set_fields(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets the fields of `config` named by dotted keys ({'eval.batch_size': 4}); returns `config`."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


class WorkdirLockedError(RuntimeError):
    """Another training run holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _read_holder(path: str) -> dict | None:
    """The lock file's holder, {} when unreadable, or None when the file is gone."""
    try:
        with open(path) as f:
            holder = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


@dataclasses.dataclass
class WorkdirLock:
    """WORKDIR/.lock, held by this process: {'pid', 'host', 'started' (UTC, ISO 8601)}."""

    path: str
    holder: dict

    @classmethod
    def acquire(cls, workdir: str) -> WorkdirLock:
        """Creates `workdir` and takes its lock; a lock whose process is gone from this host is replaced
        (with a warning). Raises WorkdirLockedError naming the holder when another run holds it."""
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, LOCK_FILE)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        staged = f"{path}.{holder['pid']}.tmp"
        with open(staged, "w") as f:
            json.dump(holder, f)
        try:
            while True:
                try:
                    os.link(staged, path)  # atomic: the lock appears with its content, or not at all
                    return cls(path, holder)
                except FileExistsError:
                    current = _read_holder(path)
                    if current is None:  # released in the meantime
                        continue
                    if not cls._stale(current, holder["host"]):
                        raise WorkdirLockedError(cls._describe(workdir, path, current)) from None
                    logging.warning("Replacing the stale lock %s of pid %s, which is no longer running on %s.",
                                    path, current["pid"], current["host"])
                    try:
                        os.remove(path)
                    except FileNotFoundError:
                        pass
        finally:
            os.remove(staged)

    @staticmethod
    def _stale(current: dict, host: str) -> bool:
        """Whether the lock's holder is a process of this host that no longer runs."""
        pid = current.get("pid")
        return current.get("host") == host and isinstance(pid, int) and not _pid_alive(pid)

    @staticmethod
    def _describe(workdir: str, path: str, current: dict) -> str:
        if not current:
            return (f"{workdir} is locked by {path}, which is unreadable; if no training run uses this workdir, "
                    "delete it")
        return (f"{workdir} is in use by another training run (pid {current.get('pid')} on host "
                f"{current.get('host')}, started {current.get('started')}); wait for it to end or use another "
                f"--workdir (if that run is gone, delete {path})")

    def release(self) -> None:
        """Removes the lock file if this process holds it (idempotent; a forked child never removes it)."""
        if os.getpid() == self.holder["pid"] and _read_holder(self.path) == self.holder:
            os.remove(self.path)


def folder_problem(path: str, writing: bool = True) -> str | None:
    """Why `path` cannot be a folder (a file stands where it or a parent folder should be) or, when
    `writing`, cannot be written into (the nearest existing folder is read-only: its modes, a read-only
    mount); None when it can. A missing folder counts as its nearest existing parent, which would hold it."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    if writing and not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
