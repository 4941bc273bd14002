"""Confusion matrix (on device) and the metrics derived from it: IoU per class, mIoU, accuracies;
the per-class IoU as a compact text table for the logs."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from csl_jax.constants import IGNORE_INDEX


def confusion_matrix(labels: jax.Array, preds: jax.Array, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Counts of (ground truth, prediction) pairs, on device.

    Args:
      labels: integer array of any shape (e.g. (B, H, W) uint8/int32).
      preds: integer array of the same shape, values in [0, num_classes).
      num_classes: C.
      ignore_index: label value that is not counted.

    Returns:
      (C, C) int32, rows = ground truth, columns = prediction. Pixels whose label is
      `ignore_index` or outside [0, C), or whose prediction is outside [0, C), are not counted
      (the Evaluator rejects such labels on the host before they get here).
    """
    labels = jnp.asarray(labels).reshape(-1).astype(jnp.int32)
    preds = jnp.asarray(preds).reshape(-1).astype(jnp.int32)
    c = num_classes
    valid = (labels != ignore_index) & (labels >= 0) & (labels < c) & (preds >= 0) & (preds < c)
    flat = jnp.where(valid, labels * c + preds, c * c)  # invalid pixels land in an extra bin
    counts = jnp.bincount(flat, length=c * c + 1)
    return counts[: c * c].reshape(c, c).astype(jnp.int32)


def segmentation_metrics(conf: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU and accuracies from a (C, C) int64 confusion matrix (rows = ground truth).

    I_c = N_cc, U_c = row_c + col_c - N_cc, IoU_c = I_c / (U_c + 1e-10); mIoU is the mean over
    all C classes (a class with U_c = 0 counts as 0, with a warning naming it). pixel_acc is
    sum(I) / sum(N); mean_acc is the mean of N_cc / row_c over classes present in the ground truth.

    Returns:
      {'miou': float, 'iou': list[float] (C,), 'pixel_acc': float, 'mean_acc': float}.
    """
    conf = np.asarray(conf, np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {conf.shape}")
    inter = np.diag(conf).astype(np.float64)
    gt = conf.sum(axis=1).astype(np.float64)
    union = gt + conf.sum(axis=0) - inter
    iou = inter / (union + 1e-10)
    absent = np.flatnonzero(union == 0)
    if absent.size:
        names = [class_names[i] if class_names else str(i) for i in absent]
        logging.warning("classes never in ground truth nor prediction (IoU counted as 0): %s", ", ".join(names))
    present = gt > 0
    return {
        "miou": float(iou.mean()),
        "iou": [float(v) for v in iou],
        "pixel_acc": float(inter.sum() / max(conf.sum(), 1)),
        "mean_acc": float((inter[present] / gt[present]).mean()) if present.any() else 0.0,
    }


def iou_table(iou: Sequence[float], class_names: Sequence[str], columns: int = 5, width: int = 16) -> str:
    """IoU per class as text for the logs: `columns` cells 'name IoU%' per line, in class order.

    iou: C fractions; class_names: C names, cut to `width` characters (ending in '~' when cut).
    150 classes take 30 lines of at most 120 characters, each line indented by 2 spaces.
    """
    if len(class_names) != len(iou):
        raise ValueError(f"{len(class_names)} class names for {len(iou)} IoU values")
    width = min(width, max(len(n) for n in class_names))
    cells = [f"{n if len(n) <= width else n[: width - 1] + '~':<{width}} {100 * v:5.1f}"
             for n, v in zip(class_names, iou)]
    return "\n".join("  " + "  ".join(cells[i : i + columns]) for i in range(0, len(cells), columns))
