"""Evaluation of segmentation models.

- metrics: confusion matrix (on device), per-class IoU, mIoU and accuracies.
- protocols: the whole-image, sliding-window and centre-crop protocols as `Protocol` records
  (registry `PROTOCOLS`, `get_protocol`) and their window geometry.
- evaluator: `Evaluator`, sharded inference of one protocol over a dataset (metrics, predictions).
- folder: segments every image of a folder into mask, colour and overlay PNGs.
"""

from csl_jax.evaluation.evaluator import Evaluator
from csl_jax.evaluation.metrics import confusion_matrix, segmentation_metrics
from csl_jax.evaluation.protocols import PROTOCOLS, get_protocol

__all__ = ["Evaluator", "PROTOCOLS", "confusion_matrix", "get_protocol", "segmentation_metrics"]
