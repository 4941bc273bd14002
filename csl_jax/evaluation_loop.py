"""Evaluation inside and outside training: val mIoU, plots, `--mode=eval` and `--mode=predict`."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from csl_jax import checkpoint, evaluate, parallel, visualize
from csl_jax import data
from csl_jax.methods import build_method
from csl_jax.models import build_model


def _apply_fn(model):
    def apply(variables, images):
        return model.apply(variables, images, train=False)

    return apply


def json_ready(results: dict) -> dict:
    """The scalar/list part of an evaluation result (drops the confusion matrix and image samples)."""
    out = {k: v for k, v in results.items() if k not in ("confusion", "samples")}
    return json.loads(json.dumps(out, default=lambda x: x.tolist() if hasattr(x, "tolist") else float(x)))


class EvalLoop:
    """The evaluator of a training run: val metrics, a prediction grid and the method's diagnostics."""

    def __init__(self, config: ml_collections.ConfigDict, info, workdir: str, mesh, method):
        self.config = config
        self.method = method
        self.plot_dir = os.path.join(workdir, "plots")
        self.palette = visualize.palette_for(info.name, info.num_classes)
        self.dataset = data.eval_dataset(config.data, split="val")
        self.evaluator = evaluate.Evaluator(
            _apply_fn(build_model(config.model, info.num_classes)), num_classes=info.num_classes,
            protocol=config.eval.protocol, crop_size=config.data.crop_size,
            batch_size=config.eval.batch_size or mesh.devices.size, mesh=mesh, class_names=info.class_names,
            pad_to_multiple=config.eval.pad_to_multiple)

    def run(self, step: int, variables: Any, state: Any = None, streams_sample: dict | None = None) -> dict:
        """Evaluates `variables` on val; writes plots (process 0). Returns JSON-ready results."""
        results = self.evaluator.evaluate(variables, self.dataset, max_images=self.config.eval.max_images or None,
                                          num_samples=self.config.eval.num_plot_images)
        logging.info("step %d: val mIoU %.2f (%s, %d images)", step, 100 * results["miou"],
                     self.config.eval.protocol, results["num_images"])
        if jax.process_index() == 0 and results["samples"]:
            os.makedirs(self.plot_dir, exist_ok=True)
            images, preds, labels = zip(*results["samples"])
            visualize.prediction_grid(images, preds, labels, self.palette,
                                      os.path.join(self.plot_dir, f"val_step{step:07d}.png"))
            if state is not None and streams_sample is not None and hasattr(self.method, "plot_diagnostics"):
                self.method.plot_diagnostics(state, streams_sample, self.plot_dir, step, self.palette)
        return json_ready(results)


def load_eval_variables(config: ml_collections.ConfigDict, workdir: str, which: str, num_classes: int) -> tuple[Any, str]:
    """Variables to evaluate: 'best' or 'latest' checkpoint of `workdir`, or a converted/PyTorch file."""
    if which == "best":
        variables, meta = checkpoint.Checkpointer(workdir).restore_best()
        return variables, f"best checkpoint of {workdir} (step {meta['step']}, val mIoU {meta['miou']:.4f})"
    if which == "latest":
        ckpt = checkpoint.Checkpointer(workdir)
        raw, _, step = ckpt.restore(None)
        model = build_model(config.model, num_classes)
        method = build_method(config, model, num_classes)
        return method.eval_variables(raw["params"], raw["batch_stats"], raw["extra"]), f"latest checkpoint (step {step})"
    if not os.path.exists(which):
        raise FileNotFoundError(f"--checkpoint={which!r} is neither 'best', 'latest' nor an existing file")
    from csl_jax.models import convert

    model = build_model(config.model, num_classes)
    init = model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 33, 33, 3)), train=False)
    variables, report = convert.load_pretrained(init, which, kind=config.model.init_kind)
    if report["left_at_init"]:
        raise ValueError(f"--checkpoint={which} is a {report['kind']} checkpoint without the head "
                         f"({len(report['left_at_init'])} variables missing); evaluate a full model")
    return variables, f"imported {which} ({report['kind']})"


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, which: str = "best") -> dict:
    """`--mode=eval`: evaluates a checkpoint on the whole val set and writes eval_<which>.json."""
    info = data.dataset_info(config.data)
    variables, source = load_eval_variables(config, workdir, which, info.num_classes)
    mesh = parallel.make_mesh()
    model = build_model(config.model, info.num_classes)
    evaluator = evaluate.Evaluator(_apply_fn(model), num_classes=info.num_classes, protocol=config.eval.protocol,
                                   crop_size=config.data.crop_size, batch_size=config.eval.batch_size or None,
                                   mesh=mesh, class_names=info.class_names, pad_to_multiple=config.eval.pad_to_multiple)
    results = json_ready(evaluator.evaluate(variables, data.eval_dataset(config.data, split="val")))
    results["source"] = source
    name = which if which in ("best", "latest") else "imported"
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"eval_{name}.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(f"val mIoU {100 * results['miou']:.2f} ({results['protocol']}) from {source}")
    return results


def predict(config: ml_collections.ConfigDict, workdir: str, which: str, input_dir: str, output_dir: str | None) -> None:
    """`--mode=predict`: segments every image of `input_dir`; writes masks, colour masks, overlays."""
    from csl_jax import predict as predict_lib

    info = data.dataset_info(config.data)
    variables, source = load_eval_variables(config, workdir, which, info.num_classes)
    output_dir = output_dir or os.path.join(workdir, "predictions")
    protocol = "whole" if config.eval.protocol == "center_crop" else config.eval.protocol
    model = build_model(config.model, info.num_classes)
    predict_lib.predict_folder(_apply_fn(model), variables, input_dir, output_dir,
                               palette=visualize.palette_for(info.name, info.num_classes),
                               num_classes=info.num_classes, protocol=protocol, crop_size=config.data.crop_size)
    print(f"wrote predictions of {source} to {output_dir}")
