"""The evaluations of a training run: which ones (from the config), running them, and their plots.

An evaluation is a record: a predict function of the method, a split and a protocol
(`config.eval.evaluations`, e.g. "teacher,student" or "model@test:sliding"); one of them
(`config.eval.best`) picks the best checkpoint. EMA-teacher methods evaluate the teacher and the
student by default, and the teacher picks the best, as in the papers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Protocol, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from csl_jax import data, visualize
from csl_jax.constants import IGNORE_INDEX
from csl_jax.evaluation.evaluator import Evaluator
from csl_jax.evaluation.metrics import iou_table
from csl_jax.evaluation.protocols import RESIZE_MULTIPLE, get_protocol


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation of a run: `predict` (a name of `Method.predict_fns()`) on `split` with `protocol`."""

    name: str
    predict: str
    split: str
    protocol: str


def parse_evaluation(entry: str, default_protocol: str) -> Evaluation:
    """'PREDICT[@SPLIT][:PROTOCOL]' -> Evaluation (split default 'val', protocol default `default_protocol`)."""
    head, _, protocol = entry.strip().partition(":")
    predict, _, split = head.partition("@")
    if not predict:
        raise ValueError(f"config.eval.evaluations entry {entry!r} names no predict function; "
                         "expected PREDICT[@SPLIT][:PROTOCOL], e.g. 'teacher' or 'model@test:sliding'")
    return Evaluation(name=entry.strip(), predict=predict, split=split or "val", protocol=protocol or default_protocol)


def plan_evaluations(eval_cfg: ml_collections.ConfigDict, method) -> tuple[list[Evaluation], Evaluation]:
    """(the run's evaluations, the one that picks the best checkpoint), checked against the method.

    `eval_cfg.evaluations` "" means every predict function of the method on val; `eval_cfg.best`
    "" means the method's `best_predict` evaluation (or the first one).
    """
    predict_fns = method.predict_fns()
    spec = eval_cfg.get("evaluations", "") or ",".join(predict_fns)
    evaluations = [parse_evaluation(entry, eval_cfg.protocol) for entry in spec.split(",") if entry.strip()]
    names = [e.name for e in evaluations]
    if len(set(names)) != len(names):
        raise ValueError(f"config.eval.evaluations={spec!r} names an evaluation twice")
    for e in evaluations:
        if e.predict not in predict_fns:
            raise ValueError(f"config.eval.evaluations: {e.name!r} names predict function {e.predict!r}; the method "
                             f"{type(method).__name__} has {sorted(predict_fns)}")
        get_protocol(e.protocol)
    best_name = eval_cfg.get("best", "")
    if best_name:
        if best_name not in names:
            raise ValueError(f"config.eval.best={best_name!r} is none of the evaluations {names}")
        best = evaluations[names.index(best_name)]
    else:
        best = next((e for e in evaluations if e.predict == method.best_predict), evaluations[0])
    return evaluations, best


def make_evaluator(config: ml_collections.ConfigDict, info, mesh, method, evaluation: Evaluation,
                   batch_size: int | None = None) -> Evaluator:
    """The sharded evaluator of `evaluation`: its predict function under its protocol."""
    return Evaluator(method.predict_fns()[evaluation.predict], num_classes=info.num_classes,
                     protocol=evaluation.protocol, crop_size=config.data.crop_size, batch_size=batch_size, mesh=mesh,
                     class_names=info.class_names, pad_to_multiple=config.eval.pad_to_multiple,
                     pad_label=config.eval.get("center_crop_pad_label", IGNORE_INDEX),
                     resize_multiple=config.eval.get("resize_multiple", RESIZE_MULTIPLE))


def json_ready(results: dict, class_names: Sequence[str]) -> dict:
    """The scalar/list part of an evaluation result (drops the confusion matrix and image samples)
    plus 'iou_per_class' ({class name: IoU}, in class order) and 'unit': 'fraction' (every mIoU,
    IoU and accuracy is a fraction in [0, 1], not a percentage)."""
    if len(class_names) != len(results["iou"]):
        raise ValueError(f"{len(class_names)} class names for {len(results['iou'])} IoU values")
    out = {k: v for k, v in results.items() if k not in ("confusion", "samples")}
    out.update(iou_per_class=dict(zip(class_names, results["iou"])), unit="fraction")
    return json.loads(json.dumps(out, default=lambda x: x.tolist() if hasattr(x, "tolist") else float(x)))


class ImageWriter(Protocol):
    """Where the prediction grid goes besides its PNG, e.g. `MetricsWriter` (TensorBoard)."""

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Logs an (H, W, 3) uint8 image under `tag` at `step`."""


class EvalLoop:
    """The evaluations of a training run: metrics of each, a prediction grid and the method's diagnostics."""

    def __init__(self, config: ml_collections.ConfigDict, info, workdir: str, mesh, method):
        self.config = config
        self.method = method
        self.plot_dir = os.path.join(workdir, "plots")
        self.class_names = info.class_names
        self.palette = visualize.palette_for(info.name, info.num_classes)
        self.evaluations, self.best = plan_evaluations(config.eval, method)
        batch = config.eval.batch_size or mesh.devices.size
        self.evaluators = {e.name: make_evaluator(config, info, mesh, method, e, batch) for e in self.evaluations}
        self.datasets = {split: data.eval_dataset(config.data, split=split)
                         for split in dict.fromkeys(e.split for e in self.evaluations)}
        self._diagnostics = jax.jit(method.diagnostics) if method.has_diagnostics else None

    def run(self, step: int, train_state, train_batch: Mapping[str, Any] | None = None,
            writer: ImageWriter | None = None) -> dict[str, dict]:
        """Runs every evaluation on `train_state`; writes plots (process 0). Returns {name: JSON-ready results}.

        Logs each evaluation's mIoU, and the IoU per class of the best evaluation (`iou_table`).

        The best evaluation draws `config.eval.num_plot_images` val images spread over the split
        (`evaluator.spread_indices`) into plots/{split}_step{step:07d}.png, and into `writer` (when
        given) as `writer.write_image(step, f"{split}/predictions", grid)`, grid (H, W, 3) uint8.
        """
        out = {}
        for e in self.evaluations:
            is_best = e is self.best
            results = self.evaluators[e.name].evaluate(
                self.method.eval_variables(train_state, e.predict), self.datasets[e.split],
                max_images=self.config.eval.max_images or None,
                num_samples=self.config.eval.num_plot_images if is_best else 0)
            logging.info("step %d: %s mIoU %.2f (%s, %s, %d images)%s", step, e.name, 100 * results["miou"], e.split,
                         e.protocol, results["num_images"], " [picks best]" if is_best else "")
            if is_best:
                logging.info("step %d: %s IoU per class (%%):\n%s", step, e.name,
                             iou_table(results["iou"], self.class_names))
            if jax.process_index() == 0 and results["samples"]:
                os.makedirs(self.plot_dir, exist_ok=True)
                images, preds, labels = zip(*results["samples"])
                grid = visualize.prediction_grid(images, preds, labels, self.palette,
                                                 os.path.join(self.plot_dir, f"{e.split}_step{step:07d}.png"))
                if writer is not None:
                    writer.write_image(step, f"{e.split}/predictions", grid)
            out[e.name] = dict(json_ready(results, self.class_names), evaluation=e.name, predict=e.predict,
                               split=e.split)
        if self._diagnostics is not None and train_batch is not None and jax.process_index() == 0:
            plot_diagnostics(self._diagnostics, train_state, train_batch, self.plot_dir, step, self.palette,
                             self.config.eval.num_plot_images)
        return out


def plot_diagnostics(diagnostics, train_state, train_batch: Mapping[str, Any], plot_dir: str, step: int,
                     palette: np.ndarray, num_images: int) -> None:
    """Draws a method's pseudo-label diagnostics (`Method.diagnostics`) for a few images of a train batch.

    diagnostics: the jitted `method.diagnostics(train_state, batch)`. Files:
    `pseudo_labels_step{step:07d}.png` (labelled columns: weak view, pseudo-label, weight map and,
    for methods with TMP, the TMP-masked view) for `num_images` images of the batch's unlabeled stream, and
    `confidence_step{step:07d}.png` for the first one (its valid pixels with a ground truth, or all
    valid pixels when it has none, which are then drawn as wrong).
    """
    batch = jax.tree.map(lambda x: _local_rows(x, max(1, num_images)), dict(train_batch))
    d = jax.device_get(diagnostics(train_state, batch))
    os.makedirs(plot_dir, exist_ok=True)
    labels = np.where(d["valid"], d["pseudo_label"], IGNORE_INDEX)
    visualize.pseudo_label_panel(d["weak"], labels, d["weight"], d.get("tmp"),
                                 os.path.join(plot_dir, f"pseudo_labels_step{step:07d}.png"), palette)
    known = d["valid"][0] & (batch["unlabeled"]["label"][0] != IGNORE_INDEX)
    keep = known if known.any() else d["valid"][0]
    visualize.confidence_space_plot(
        d["conf"][0][keep], d["var"][0][keep], d["correct"][0][keep], d["reliable"][0][keep],
        d["weight"][0][keep], os.path.join(plot_dir, f"confidence_step{step:07d}.png"),
        cluster_means=d["cluster_means"][0])


def _local_rows(x, n: int) -> np.ndarray:
    """The first `n` rows this process holds of a (possibly sharded global) array, as NumPy."""
    shards = getattr(x, "addressable_shards", None)
    if shards is None:
        return np.asarray(x)[:n]
    shards = sorted(shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])[:n]
