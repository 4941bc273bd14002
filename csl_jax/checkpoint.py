"""Checkpoints: the only module that talks to orbax.

A workdir holds `checkpoints/<step>/` (the latest `keep` saves: train state + data-iterator
states, for exact resume) and `best/<step>/` (the evaluated variables with the best val mIoU).
Saves are asynchronous; `wait()` blocks until they are on disk.

Failures are reported in one message each: at a training resume, a train-state checkpoint that
cannot be read (a file missing or truncated) is moved aside to `checkpoints/<step>.damaged` and the
one before it restored (`CheckpointDamagedError` when none can be read); for evaluation
(`restore_latest`, `restore_best`) one that cannot be read is a `CheckpointDamagedError` naming it,
with no fallback and nothing moved; one saved by another method or config is a ValueError; a save
that cannot be written (disk full, ...) is a `CheckpointWriteError`.
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointDamagedError(RuntimeError):
    """A checkpoint that must be read cannot be (files missing or truncated)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions, ...); training stops."""


class _OneLineOrbaxErrors(std_logging.Filter):
    """Drops the tracebacks of orbax's error log records and of asyncio's about orbax tasks (the
    Checkpointer raises one clear error for the same failure); the records' messages stay. asyncio's
    'Future exception was never retrieved' about a tensorstore read (a read of a damaged checkpoint
    that the failed restore abandoned, reported when the future is collected, possibly after the
    error line at exit) is dropped whole."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Future exception was never retrieved") and "tensorstore_spec" in message:
            return False
        if record.exc_info and ("/orbax/" in record.pathname or "/orbax/" in message):
            record.exc_info, record.exc_text = None, None
        return True


_ORBAX_ERRORS = _OneLineOrbaxErrors()


class _QuietAbandonedReads:
    """A sys.unraisablehook that drops the reports of the orbax reads a failed restore abandons,
    'Exception ignored in <coroutine ...>' and 'RuntimeError: Event loop is closed' from tensorstore's
    callbacks (hundreds of traceback lines, some after the restore returned); it passes every other
    unraisable exception on to the hook it replaced."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        orbax_read = code is not None and "/orbax/" in code.co_filename
        closed_loop = unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
        if not (orbax_read or closed_loop):
            self.previous(unraisable)


def _one_line(error: BaseException, limit: int = 300) -> str:
    """'Type: first line of the message', at most `limit` characters."""
    text = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _disk_full(error: BaseException) -> bool:
    """Whether `error` (an OSError, or tensorstore's ValueError with the OS error code) is ENOSPC."""
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    return "No space left on device" in str(error) or f"os_error_code='{errno.ENOSPC}'" in str(error)


def _flat_shapes(tree: Any) -> dict[tuple, tuple]:
    """{key path: shape} of a pytree (a train state, its abstract version or orbax's metadata tree)."""
    flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True))
    return {path: tuple(getattr(leaf, "shape", None) or ()) for path, leaf in flat.items()}


class Checkpointer:
    """Latest-N train-state checkpoints and the single best-by-mIoU evaluated model of a workdir."""

    def __init__(self, workdir: str, keep: int = 2, async_save: bool = True, read_only: bool = False):
        """read_only: for evaluation, which only reads (`restore_latest`, `restore_best`): creates no folder."""
        for logger in ("absl", "asyncio"):
            std_logging.getLogger(logger).addFilter(_ORBAX_ERRORS)  # once: the same filter object
        if not isinstance(sys.unraisablehook, _QuietAbandonedReads):
            sys.unraisablehook = _QuietAbandonedReads(sys.unraisablehook)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=not read_only)
        self._latest = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)
        best_options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=async_save,
                                                    create=not read_only)
        self._best = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "best"), options=best_options)
        self._in_flight: dict[ocp.CheckpointManager, int | None] = {self._latest: None, self._best: None}

    def latest_step(self) -> int | None:
        """Step of the newest complete train-state checkpoint, or None."""
        return self._latest.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Saves the train state and the JSON-able data-iterator states at `step` (async).

        Raises CheckpointWriteError when this save, or the previous one still being written, fails.
        """
        self._save(self._latest, step,
                   ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

    def _save(self, manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> None:
        """`manager.save` (forced), its failures and those of the previous async save as CheckpointWriteError."""
        self._finish(manager)
        try:
            manager.save(step, args=args, force=True)
        except (OSError, ValueError) as error:  # tensorstore reports OS errors as ValueError
            raise self._write_error(manager, step, error) from None
        self._in_flight[manager] = step

    def _finish(self, manager: ocp.CheckpointManager) -> None:
        """Waits for `manager`'s pending async save; its failure becomes a CheckpointWriteError."""
        try:
            manager.wait_until_finished()
        except (OSError, ValueError) as error:
            raise self._write_error(manager, self._in_flight[manager], error) from None
        finally:
            self._in_flight[manager] = None

    def _write_error(self, manager: ocp.CheckpointManager, step: int | None, error: BaseException) -> OSError:
        """The one clear message of a failed save of `step` into `manager`'s folder."""
        cause = "the disk is full; free space (or lower config.keep_checkpoints)" if _disk_full(error) else (
            "fix the cause")
        resume = self._latest.latest_step()
        return CheckpointWriteError(
            f"could not write the checkpoint of step {step} to {manager.directory} ({_one_line(error)}). Training "
            f"stops: {cause} and rerun the same command to "
            f"{'start again from step 0' if resume is None else f'resume from the checkpoint of step {resume}'}.")

    def restore(self, abstract_state: Any) -> tuple[Any, dict, int]:
        """A training resume: restores (state, data_state, step) of the newest readable checkpoint onto
        `abstract_state`'s sharding (None: the arrays as saved).

        A checkpoint that cannot be read (a file missing or truncated) is moved aside to
        `<step>.damaged` with a warning and the one before it is restored. Raises
        CheckpointDamagedError when no checkpoint can be read, moving nothing, and ValueError when a
        checkpoint holds another train state (another method, model or config).
        """
        steps = sorted(self._latest.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self._latest.directory}")
        damaged = []
        for candidate in steps:
            restored, reason = self._read(self._latest, candidate, self._state_args(abstract_state))
            if restored is not None:
                break
            mismatch = self._mismatch(candidate, abstract_state)
            if mismatch:
                raise ValueError(
                    f"checkpoint {self._latest.directory}/{candidate} does not match this run's train state "
                    f"({mismatch}): another method, model or config, or a csl_jax before the method framework "
                    f"v2, whose states had 'batch_stats'/'extra' fields; train in a new --workdir.")
            damaged.append((candidate, reason))
        else:
            folders = "; ".join(f"{self._latest.directory}/{s} ({reason})" for s, reason in damaged)
            raise CheckpointDamagedError(
                f"no readable checkpoint: {folders}. A file is missing or truncated (a crash or a full disk "
                "while saving?). Nothing was changed; move these folders away to train from step 0, or train "
                "in a new --workdir.")
        for bad, reason in damaged:
            self._move_aside(bad, reason, candidate)
        return restored.state, restored.data, candidate

    def restore_latest(self) -> tuple[Any, int]:
        """For evaluation: (the train state as saved, step) of the newest train-state checkpoint; see
        `_restore_newest`."""
        restored, step = self._restore_newest(self._latest, self._state_args(None), "train-state checkpoint")
        return restored.state, step

    @staticmethod
    def _state_args(abstract_state: Any) -> ocp.args.Composite:
        return ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())

    @staticmethod
    def _read(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> tuple[Any, str]:
        """(orbax's restored Composite, '') of `manager`'s `step`, or (None, why it could not be read in one line)."""
        try:
            return manager.restore(step, args=args), ""
        except Exception as error:  # orbax/tensorstore raise many types for damaged files
            return None, _one_line(error)

    def _restore_newest(self, manager: ocp.CheckpointManager, args: ocp.args.Composite,
                        what: str) -> tuple[Any, int]:
        """(orbax's restored Composite, step) of `manager`'s newest checkpoint, never an older one.

        Raises FileNotFoundError when there is none and CheckpointDamagedError (one line naming the
        folder) when it cannot be read; nothing is moved or written.
        """
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no {what} in {manager.directory}")
        restored, reason = self._read(manager, step, args)
        if restored is None:
            raise CheckpointDamagedError(
                f"the {what} {manager.directory}/{step} cannot be read ({reason}). A file is missing or truncated "
                "(a crash or a full disk while saving?); nothing was changed.")
        return restored, step

    def _mismatch(self, step: int, abstract_state: Any) -> str:
        """How `step`'s saved tree differs from `abstract_state` ('' when alike or unreadable: damage)."""
        if abstract_state is None:
            return ""
        try:
            saved = self._latest.item_metadata(step).state
        except Exception:  # unreadable metadata is damage, not a mismatch
            return ""
        if saved is None:
            return ""
        saved, wanted = _flat_shapes(saved.tree), _flat_shapes(abstract_state)
        parts = []
        for label, keys in (("only in this run", sorted(set(wanted) - set(saved))),
                            ("only in the checkpoint", sorted(set(saved) - set(wanted))),
                            ("other shapes", sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k]))):
            if keys:
                shown = ", ".join("/".join(k) for k in keys[:3])
                parts.append(f"{label}: {shown}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}")
        return "; ".join(parts)

    def _move_aside(self, step: int, reason: str, restored: int) -> None:
        """Renames the damaged `checkpoints/<step>` to `<step>.damaged` (process 0), never deleting it."""
        source = os.path.join(str(self._latest.directory), str(step))
        target, n = f"{source}.damaged", 1
        while os.path.exists(target):
            target, n = f"{source}.damaged{n}", n + 1
        if jax.process_index() == 0:
            os.rename(source, target)
        logging.warning("Checkpoint %s is damaged (%s); moved it to %s and restored step %d instead.",
                        source, reason, target, restored)
        ocp.multihost.sync_global_processes("csl_jax_checkpoint_moved_aside")
        self._latest.reload()

    def save_best(self, step: int, variables: Any, miou: float, **meta: str) -> None:
        """Saves the evaluated variables as the best so far (mIoU `miou`); `meta` (e.g. the
        evaluation and predict function names) is stored beside them. Raises CheckpointWriteError
        as `save`."""
        self._save(self._best, step, ocp.args.Composite(
            variables=ocp.args.StandardSave(variables),
            meta=ocp.args.JsonSave({"step": step, "miou": miou, **meta})))

    def best_meta(self) -> dict | None:
        """{'step', 'miou', ...} of the best checkpoint, or None when there is none."""
        step = self._best.latest_step()
        if step is None:
            return None
        return self._best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_best(self) -> tuple[Any, dict]:
        """(variables as saved, meta) of the best checkpoint; see `_restore_newest`."""
        restored, _ = self._restore_newest(
            self._best, ocp.args.Composite(variables=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
            "best checkpoint")
        return restored.variables, restored.meta

    def check_saves(self) -> None:
        """Raises CheckpointWriteError when an async save that has ended failed; never blocks (a
        failure is otherwise reported by the next save, `wait` or `close`)."""
        for manager in (self._latest, self._best):
            if self._in_flight[manager] is not None and not manager.is_saving_in_progress():
                self._finish(manager)

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is complete; raises CheckpointWriteError as `save`."""
        self._finish(self._latest)
        self._finish(self._best)

    def close(self) -> None:
        self.wait()
        self._latest.close()
        self._best.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, the target of a restore."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
