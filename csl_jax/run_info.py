"""What a run records about itself in its workdir: resolved config, overrides, versions, commit."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import jax
import ml_collections

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


def prepare(config: ml_collections.ConfigDict, workdir: str, mode: str) -> None:
    """Creates `workdir` and writes config.json, run_<mode>.json (argv overrides, versions, commit).

    Only process 0 writes. (The data is prepared by `csl_jax.data.ensure_prepared`.)
    """
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))
    info = {
        "mode": mode,
        "argv": sys.argv,
        "overrides": [a for a in sys.argv[1:] if a.startswith("--config.")],
        "versions": package_versions(),
        "git_commit": git_commit(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
    }
    with open(os.path.join(workdir, f"run_{mode}.json"), "w") as f:
        json.dump(info, f, indent=1)
