"""Checkpoints: the only module that talks to orbax.

A workdir holds `checkpoints/<step>/` (the latest `keep` saves: train state + data-iterator
states, for exact resume) and `best/<step>/` (the evaluated variables with the best val mIoU).
Saves are asynchronous; `wait()` blocks until they are on disk.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Latest-N train-state checkpoints and the single best-by-mIoU evaluated model of a workdir."""

    def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._latest = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)
        best_options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=async_save, create=True)
        self._best = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "best"), options=best_options)

    def latest_step(self) -> int | None:
        """Step of the newest complete train-state checkpoint, or None."""
        return self._latest.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Saves the train state and the JSON-able data-iterator states at `step` (async)."""
        self._latest.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=True,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restores (state, data_state, step) of `step` (default latest) onto `abstract_state`'s sharding."""
        step = self._latest.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self._latest.directory}")
        try:
            restored = self._latest.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                              data=ocp.args.JsonRestore()))
        except (ValueError, KeyError) as error:  # orbax: the saved tree does not match the target
            raise ValueError(
                f"checkpoint {self._latest.directory}/{step} does not match this run's train state (another "
                f"method, model or config, or a csl_jax before the method framework v2, whose states had "
                f"'batch_stats'/'extra' fields); train in a new --workdir. orbax said: {error}") from error
        return restored.state, restored.data, step

    def save_best(self, step: int, variables: Any, miou: float, **meta: str) -> None:
        """Saves the evaluated variables as the best so far (mIoU `miou`); `meta` (e.g. the
        evaluation and predict function names) is stored beside them."""
        self._best.save(
            step, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                          meta=ocp.args.JsonSave({"step": step, "miou": miou, **meta})),
            force=True,
        )

    def best_meta(self) -> dict | None:
        """{'step', 'miou', ...} of the best checkpoint, or None when there is none."""
        step = self._best.latest_step()
        if step is None:
            return None
        return self._best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_best(self, abstract_variables: Any = None) -> tuple[Any, dict]:
        """(variables, meta) of the best checkpoint; raises FileNotFoundError when there is none."""
        step = self._best.latest_step()
        if step is None:
            raise FileNotFoundError(f"no best checkpoint in {self._best.directory}")
        var_args = ocp.args.StandardRestore(abstract_variables) if abstract_variables is not None else (
            ocp.args.StandardRestore())
        restored = self._best.restore(step, args=ocp.args.Composite(variables=var_args, meta=ocp.args.JsonRestore()))
        return restored.variables, restored.meta

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is complete."""
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._latest.close()
        self._best.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, the target of a restore."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
