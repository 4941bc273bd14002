"""Training logs: metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow), progress line.

Files in `workdir`:
  metrics.jsonl       one JSON object per `write`/`write_eval` call: {"step", "time", name: value}
  eval_results.jsonl  one JSON object per `write_eval` call: the full evaluation result
  tb/                 TensorBoard event files: the training scalars under 'train/<name>', the
                      evaluation ones under their metrics.jsonl names, images (`write_image`)
Only the main process writes; on the others every method is a no-op. A run resumed at step S
(`start_step`) first drops the records of later steps, logged by the run it resumes after its
last checkpoint, so that every step is logged once.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import numpy as np
from absl import logging

EVAL_SCALARS = ("miou", "pixel_acc", "mean_acc")


def format_hms(seconds: float) -> str:
    """Seconds -> 'h:mm:ss' (hours unbounded), e.g. 3725.4 -> '1:02:05'."""
    total = int(round(max(seconds, 0.0)))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def steps_per_second(steps_done: int, elapsed_s: float) -> float:
    """Speed of `steps_done` steps that took `elapsed_s` seconds (0 when nothing was timed)."""
    return steps_done / elapsed_s if steps_done > 0 and elapsed_s > 0 else 0.0


def eta_seconds(step: int, total_steps: int, steps_per_sec: float) -> float:
    """Seconds left from `step` to `total_steps` at `steps_per_sec` (inf when the speed is 0)."""
    return max(total_steps - step, 0) / steps_per_sec if steps_per_sec > 0 else float("inf")


def _scalar(name: str, value: Any) -> float:
    """A Python float from a float/int/NumPy/JAX scalar; raises naming the metric otherwise."""
    array = np.asarray(value)
    if array.size != 1 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"metric {name!r} must be a numeric scalar, got {array.dtype} of shape {array.shape}")
    return float(array.reshape(()))


def drop_records_after(path: str, step: int) -> None:
    """Rewrites the JSONL file `path` without its records of steps > `step` (atomically: a temporary
    file, then os.replace); a missing file is left missing."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line, record_step in zip(lines, map(_record_step, lines))
            if record_step is not None and record_step <= step]
    if len(keep) == len(lines):
        return
    logging.info("Dropping %d records of steps after %d from %s (logged after the checkpoint training resumes "
                 "from).", len(lines) - len(keep), step, path)
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _record_step(line: str) -> int | None:
    """The 'step' of a JSONL record, None for the torn last line of a killed run."""
    try:
        return int(json.loads(line)["step"])
    except json.JSONDecodeError:
        return None


class MetricsWriter:
    """Writes training and evaluation metrics of a run in `workdir`.

    Args:
      workdir: run folder (created).
      total_steps: for the progress line's percentage and ETA.
      is_main_process: only the main process writes anything.
      start_step: the step training resumes at: the records of later steps are dropped from the
        JSONL files and TensorBoard discards its events of later steps (purge). None keeps all.
    """

    def __init__(self, workdir: str, *, total_steps: int, is_main_process: bool = True,
                 start_step: int | None = None):
        self.workdir = workdir
        self.total_steps = total_steps
        self.enabled = is_main_process
        self._last: tuple[int, float] | None = None  # (step, perf_counter) of the previous write
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        paths = [os.path.join(workdir, name) for name in ("metrics.jsonl", "eval_results.jsonl")]
        if start_step is not None:
            for path in paths:
                drop_records_after(path, start_step)
        self._jsonl, self._eval_jsonl = (open(path, "a") for path in paths)
        purge = None if start_step is None else start_step + 1  # events at steps >= purge are discarded
        self._tb = SummaryWriter(logdir=os.path.join(workdir, "tb"), purge_step=purge)

    def _append(self, step: int, scalars: Mapping[str, float], tb_prefix: str = "") -> None:
        record = {"step": int(step), "time": time.time(), **scalars}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(tb_prefix + name, value, global_step=int(step))
        self._tb.flush()

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs scalar training metrics at `step` (JSONL, TensorBoard under 'train/', progress line).

        `metrics`: name -> numeric scalar. Recognised in the progress line: 'loss', names starting
        with 'lr', 'steps_per_sec' (measured here between calls when absent) and 'data_wait' (the
        share of wall time spent waiting for input, 0..1).
        """
        now = time.perf_counter()
        scalars = {name: _scalar(name, value) for name, value in metrics.items()}
        if "steps_per_sec" not in scalars and self._last is not None:
            scalars["steps_per_sec"] = steps_per_second(step - self._last[0], now - self._last[1])
        self._last = (step, now)
        if scalars.get("steps_per_sec"):
            scalars["eta_seconds"] = float(eta_seconds(step, self.total_steps, scalars["steps_per_sec"]))
        if not self.enabled:
            return
        self._append(step, scalars, tb_prefix="train/")
        logging.info("%s", self.progress_line(step, scalars))

    def progress_line(self, step: int, scalars: Mapping[str, float]) -> str:
        """'step 1200/80000 (1.5%) | loss 0.4321 | lr 0.004 | 3.21 steps/s | data 5% | ETA 6:48:12'."""
        parts = [f"step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.1f}%)"]
        if "loss" in scalars:
            parts.append(f"loss {scalars['loss']:.4f}")
        parts += [f"{name} {value:.4g}" for name, value in scalars.items() if name.startswith("lr")]
        rate = scalars.get("steps_per_sec")
        if rate:
            parts.append(f"{rate:.2f} steps/s")
        if "data_wait" in scalars:
            parts.append(f"data {100.0 * scalars['data_wait']:.0f}%")
        if rate:
            parts.append(f"ETA {format_hms(eta_seconds(step, self.total_steps, rate))}")
        return " | ".join(parts)

    def write_eval(self, step: int, results: Mapping[str, Any], name: str = "", is_best_metric: bool = True) -> None:
        """Logs the result of evaluation `name` (see csl_jax.evaluation.Evaluator.evaluate) at `step`.

        metrics.jsonl and TensorBoard get, for the evaluation that picks the best checkpoint
        (`is_best_metric`), 'val/miou', 'val/pixel_acc', 'val/mean_acc' and 'val/iou/<class>' (the
        class name of `results['iou_per_class']`, spaces as '_'; the two-digit index without it);
        for the others (e.g. the student of an EMA-teacher run) the same under 'eval/<name>/'.
        eval_results.jsonl gets the whole result (image samples dropped, arrays as lists) with
        'step' and 'time'.
        """
        if not self.enabled:
            return
        prefix = "val" if is_best_metric else f"eval/{name}"
        scalars = {f"{prefix}/{k}": _scalar(k, results[k]) for k in EVAL_SCALARS if k in results}
        per_class = results.get("iou_per_class") or {f"{c:02d}": v for c, v in enumerate(results.get("iou", ()))}
        scalars.update({f"{prefix}/iou/{name.replace(' ', '_')}": _scalar(f"iou[{name}]", v)
                        for name, v in per_class.items()})
        self._append(step, scalars)
        full = {k: v for k, v in results.items() if k != "samples"}
        record = {"step": int(step), "time": time.time(), **full}
        self._eval_jsonl.write(json.dumps(record, default=lambda x: np.asarray(x).tolist()) + "\n")
        self._eval_jsonl.flush()

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Logs an (H, W, 3) uint8 RGB image to TensorBoard under `tag` at `step`."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {tag!r} must be (H, W, 3) uint8, got {image.dtype} of shape {image.shape}")
        if not self.enabled:
            return
        self._tb.add_image(tag, image, global_step=int(step), dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the files."""
        if not self.enabled:
            return
        self._jsonl.close()
        self._eval_jsonl.close()
        self._tb.close()
