"""Checkpointer failures, one clear message each: a damaged latest checkpoint (at a resume the one before
it is restored, the damaged folder moved aside; for evaluation an error), none readable, another run's
structure, a failed save."""

import errno
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from csl_jax import checkpoint


def small_state(fill: float):
    return {"a": jnp.full((10,), fill), "b": {"c": jnp.full((3, 4), fill)}}


@pytest.fixture
def workdir(tmp_path):
    """Checkpoints of steps 1 and 2 (values 1.0 and 2.0, data states {'x': step})."""
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
    for step in (1, 2):
        ckpt.save(step, small_state(float(step)), {"x": step})
    ckpt.close()
    return tmp_path


def state_files(folder):
    """The array files of a checkpoint's train state: state/d/<hash>."""
    return [os.path.join(folder, "state", "d", f) for f in sorted(os.listdir(os.path.join(folder, "state", "d")))]


def delete_array_file(folder):
    os.remove(state_files(folder)[0])


def truncate_tree_metadata(folder):
    path = os.path.join(folder, "state", "_METADATA")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def delete_data_state(folder):
    os.remove(os.path.join(folder, "data", "metadata"))


@pytest.mark.parametrize("damage", [delete_array_file, truncate_tree_metadata, delete_data_state])
def test_damaged_latest_falls_back_to_the_previous_one(workdir, damage, caplog, capfd):
    damage(str(workdir / "checkpoints" / "2"))
    ckpt = checkpoint.Checkpointer(str(workdir), keep=3)
    with caplog.at_level(logging.WARNING):
        state, data_state, step = ckpt.restore(checkpoint.abstract_like(small_state(0.0)))
    assert step == 1 and data_state == {"x": 1}
    np.testing.assert_array_equal(state["b"]["c"], np.full((3, 4), 1.0))
    damaged = workdir / "checkpoints" / "2.damaged"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"Checkpoint {workdir / 'checkpoints' / '2'} is damaged (" in w and f"moved it to {damaged} and "
               "restored step 1 instead" in w for w in warnings), warnings
    assert damaged.is_dir() and not (workdir / "checkpoints" / "2").exists()  # kept, never picked again
    assert "Exception ignored" not in capfd.readouterr().err  # no tracebacks of abandoned orbax reads

    # training goes on: the next saves and restores ignore the moved folder
    assert ckpt.latest_step() == 1
    ckpt.save(2, small_state(5.0), {"x": 5})
    ckpt.close()
    state, data_state, step = checkpoint.Checkpointer(str(workdir)).restore(None)
    assert step == 2 and data_state == {"x": 5} and float(state["a"][0]) == 5.0
    assert damaged.is_dir()


def test_no_readable_checkpoint_is_one_error_and_moves_nothing(workdir):
    for step in (1, 2):
        delete_array_file(str(workdir / "checkpoints" / str(step)))
    ckpt = checkpoint.Checkpointer(str(workdir))
    with pytest.raises(checkpoint.CheckpointDamagedError) as info:
        ckpt.restore(checkpoint.abstract_like(small_state(0.0)))
    message = str(info.value)
    assert message.startswith(f"no readable checkpoint: {workdir / 'checkpoints' / '2'} (")
    assert f"; {workdir / 'checkpoints' / '1'} (" in message
    assert "Nothing was changed; move these folders away to train from step 0" in message
    assert "\n" not in message
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]


@pytest.mark.parametrize("damage", [delete_array_file, truncate_tree_metadata, delete_data_state])
def test_for_evaluation_a_damaged_latest_is_an_error_naming_it(workdir, damage):
    """restore_latest (eval, predict) never falls back to step 1 and never moves or creates a folder."""
    damage(str(workdir / "checkpoints" / "2"))
    (workdir / "best").rmdir()  # empty, made by the fixture's Checkpointer; a read-only one makes none
    with pytest.raises(checkpoint.CheckpointDamagedError) as info:
        checkpoint.Checkpointer(str(workdir), read_only=True).restore_latest()
    message = str(info.value)
    assert message.startswith(f"the train-state checkpoint {workdir / 'checkpoints' / '2'} cannot be read (")
    assert message.endswith("). A file is missing or truncated (a crash or a full disk while saving?); nothing was "
                            "changed.") and "\n" not in message
    assert sorted(os.listdir(workdir)) == ["checkpoints"] and sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]


def test_another_structure_is_a_mismatch_not_damage(workdir):
    other = {"a": jnp.zeros((11,)), "b": {"c": jnp.zeros((3, 4)), "d": jnp.zeros(2)}}
    ckpt = checkpoint.Checkpointer(str(workdir))
    with pytest.raises(ValueError, match=r"checkpoint .*/checkpoints/2 does not match this run's train state \(only "
                                         r"in this run: b/d; other shapes: a\): another method, model or config"):
        ckpt.restore(checkpoint.abstract_like(other))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]  # nothing moved


def test_disk_full_at_save_names_the_step(workdir, monkeypatch):
    ckpt = checkpoint.Checkpointer(str(workdir), keep=3)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt._latest, "save", full)
    with pytest.raises(checkpoint.CheckpointWriteError) as info:
        ckpt.save(3, small_state(3.0), {"x": 3})
    assert str(info.value) == (
        f"could not write the checkpoint of step 3 to {workdir / 'checkpoints'} (OSError: [Errno 28] No space "
        "left on device). Training stops: the disk is full; free space (or lower config.keep_checkpoints) and rerun "
        "the same command to resume from the checkpoint of step 2.")
    assert info.value.__suppress_context__  # one message, not orbax's traceback


def test_failed_async_save_is_reported_at_the_next_save(workdir, monkeypatch):
    """The write of step 3 fails in orbax's background thread (tensorstore: a ValueError); the next
    save (or close) reports step 3."""
    ckpt = checkpoint.Checkpointer(str(workdir), keep=3)
    ckpt.save(3, small_state(3.0), {"x": 3})
    wait = ckpt._latest.wait_until_finished

    def failed():
        wait()
        raise ValueError("RESOURCE_EXHAUSTED: Error writing \"a/0\": Failed to write 1024 bytes to file 4: No space "
                         "left on device [os_error_code='28']")

    monkeypatch.setattr(ckpt._latest, "wait_until_finished", failed)
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"checkpoint of step 3 to .* \(ValueError: "
                                                              r"RESOURCE_EXHAUSTED.* Training stops: the disk is full"):
        ckpt.save(4, small_state(4.0), {"x": 4})
    monkeypatch.undo()
    ckpt.close()


def test_a_failed_async_save_is_reported_once_it_ended(workdir, monkeypatch):
    """`check_saves` (called at every log line of a run) reports a failed save that has ended
    without waiting for one still being written."""
    ckpt = checkpoint.Checkpointer(str(workdir), keep=3)
    ckpt.save(3, small_state(3.0), {"x": 3})
    wait = ckpt._latest.wait_until_finished
    monkeypatch.setattr(ckpt._latest, "is_saving_in_progress", lambda: True)
    monkeypatch.setattr(ckpt._latest, "wait_until_finished", lambda: pytest.fail("check_saves blocked"))
    ckpt.check_saves()  # still being written: nothing to report, no wait

    def failed():
        wait()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt._latest, "is_saving_in_progress", lambda: False)
    monkeypatch.setattr(ckpt._latest, "wait_until_finished", failed)
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"checkpoint of step 3 .* the disk is full"):
        ckpt.check_saves()
    monkeypatch.undo()
    ckpt.close()


def test_an_abandoned_tensorstore_read_reported_at_exit_is_dropped():
    """asyncio's 'Future exception was never retrieved' about a tensorstore read of a damaged checkpoint
    (collected after the one-line error, possibly at exit) is dropped; other asyncio errors stay."""
    import asyncio

    loop = asyncio.new_event_loop()
    future = loop.create_future()
    future.set_exception(ValueError("OUT_OF_RANGE: Error opening \"zarr\" driver [tensorstore_spec='{}']"))
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage().splitlines()[0])

    logger = logging.getLogger("asyncio")
    handler = Keep()
    logger.addHandler(handler)
    logger.addFilter(checkpoint._ORBAX_ERRORS)
    try:
        loop.call_exception_handler({"message": "Future exception was never retrieved", "exception":
                                     future.exception(), "future": future})
        loop.call_exception_handler({"message": "Task was destroyed but it is pending!"})
    finally:
        logger.removeHandler(handler)
        loop.close()
    assert seen == ["Task was destroyed but it is pending!"]
