"""`--mode=eval` and `--mode=predict`: a checkpoint's evaluation on a split, or segmentation of a folder.

The method (from the config) owns the networks and their predict functions; these modes never
build a model themselves. Which variables: the best checkpoint of the workdir (it holds the
variables of the predict function that picked it), the latest train state (any predict function),
or an imported file (a converted or PyTorch checkpoint, loaded into the predict function's
variables). A best or latest checkpoint that cannot be read is an error naming it: these modes
never fall back to an older one and never move or create anything in the workdir's checkpoint folders.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from csl_jax import checkpoint, data, visualize
from csl_jax.evaluation.folder import predict_folder
from csl_jax.evaluation.loop import Evaluation, json_ready, make_evaluator, parse_evaluation, plan_evaluations
from csl_jax.evaluation.metrics import iou_table
from csl_jax.evaluation.protocols import RESIZE_MULTIPLE
from csl_jax.methods import build_method
from csl_jax.state import TrainState


def choose_evaluation(config: ml_collections.ConfigDict, method, evaluation: str = "",
                      split: str = "") -> Evaluation:
    """The evaluation to run: `evaluation` ('PREDICT[@SPLIT][:PROTOCOL]', default: the run's best
    evaluation, `config.eval.best`) with its split replaced by `split` when given."""
    if evaluation:
        chosen = parse_evaluation(evaluation, config.eval.protocol)
    else:
        chosen = plan_evaluations(config.eval, method)[1]
    if chosen.predict not in method.predict_fns():
        raise ValueError(f"--evaluation={evaluation!r}: the method {type(method).__name__} has no predict function "
                         f"{chosen.predict!r}; valid: {sorted(method.predict_fns())}")
    if split:
        chosen = Evaluation(name=f"{chosen.predict}@{split}:{chosen.protocol}", predict=chosen.predict, split=split,
                            protocol=chosen.protocol)
    return chosen


def load_eval_variables(config: ml_collections.ConfigDict, method, workdir: str, which: str,
                        predict: str) -> tuple[Any, str]:
    """(variables of predict function `predict`, a description of their source).

    which: 'best' or 'latest' checkpoint of `workdir`, or the path of a converted/PyTorch file.
    """
    if which == "best":
        variables, meta = checkpoint.Checkpointer(workdir, read_only=True).restore_best()
        saved_for = meta.get("predict", method.best_predict)
        if saved_for != predict:
            raise ValueError(f"the best checkpoint of {workdir} holds the variables of predict function "
                             f"{saved_for!r}, not {predict!r}; use --checkpoint=latest to evaluate {predict!r}")
        return variables, (f"best checkpoint of {workdir} (step {meta['step']}, mIoU {100 * meta['miou']:.2f}, "
                           f"{saved_for})")
    if which == "latest":
        raw, step = checkpoint.Checkpointer(workdir, read_only=True).restore_latest()
        state = TrainState(step=raw["step"], params=raw["params"], opt_state=None, state=raw["state"])
        return method.eval_variables(state, predict), f"latest checkpoint (step {step}, {predict})"
    if not os.path.exists(which):
        raise FileNotFoundError(f"--checkpoint={which!r} is neither 'best', 'latest' nor an existing file")
    from csl_jax.models import convert

    from csl_jax.models import pretrained

    # the template's weights are replaced by the file's: random ones, no pretrained file read
    template_method = build_method(pretrained.random_init_config(config), method.num_classes)
    params, state = template_method.init(jax.random.PRNGKey(0), (42, 42, 3))  # any model's input (DPT: 14 k)
    template = method.eval_variables(TrainState(step=0, params=params, opt_state=None, state=state), predict)
    variables, report = convert.load_pretrained(template, which, kind=config.model.init_kind)
    if report["left_at_init"]:
        raise ValueError(f"--checkpoint={which} is a {report['kind']} checkpoint without the head "
                         f"({len(report['left_at_init'])} variables missing); evaluate a full model")
    return variables, f"imported {which} ({report['kind']})"


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, which: str = "best",
                        evaluation: str = "", split: str = "", save: bool = True) -> dict:
    """`--mode=eval`: evaluates a checkpoint on a whole split; writes eval_<which>[_<evaluation>].json
    into `workdir` when `save` (main.py: when the workdir can be written).

    The results (and the file) hold 'miou', 'iou' (a list in class order), 'iou_per_class' ({class
    name: IoU}) and the accuracies, all fractions in [0, 1] ('unit': 'fraction'). Prints the mIoU
    and logs the IoU per class in % (`iou_table`, INFO, on stderr).

    evaluation: 'PREDICT[@SPLIT][:PROTOCOL]' (default the run's best evaluation); split: 'val',
    or 'test' where prepared (overrides the evaluation's split).
    """
    info = data.dataset_info(config.data)
    method = build_method(config, info.num_classes)
    chosen = choose_evaluation(config, method, evaluation, split)
    dataset = data.eval_dataset(config.data, split=chosen.split)
    variables, source = load_eval_variables(config, method, workdir, which, chosen.predict)
    evaluator = make_evaluator(config, info, None, method, chosen, config.eval.batch_size or None)
    results = dict(json_ready(evaluator.evaluate(variables, dataset), info.class_names), source=source,
                   evaluation=chosen.name, predict=chosen.predict, split=chosen.split)
    name = which if which in ("best", "latest") else "imported"
    default = plan_evaluations(config.eval, method)[1]
    if (chosen.predict, chosen.split, chosen.protocol) != (default.predict, default.split, default.protocol):
        name += "_" + "_".join((chosen.predict, chosen.split, chosen.protocol))
    if save and jax.process_index() == 0:
        with open(os.path.join(workdir, f"eval_{name}.json"), "w") as f:
            json.dump(results, f, indent=1)
    logging.info("%s IoU per class (%%), %s:\n%s", chosen.split, chosen.name,
                 iou_table(results["iou"], info.class_names))
    print(f"{chosen.split} mIoU {100 * results['miou']:.2f} ({chosen.predict}, {results['protocol']['name']}) "
          f"from {source}")
    return results


def predict(config: ml_collections.ConfigDict, workdir: str, which: str, input_dir: str, output_dir: str,
            evaluation: str = "") -> None:
    """`--mode=predict`: segments every image of `input_dir`; writes masks, colour masks, overlays into `output_dir`.

    Uses the predict function of `evaluation` (default the run's best) under `config.eval.protocol`
    ('center_crop', which does not cover the image, falls back to 'whole').
    """
    info = data.dataset_info(config.data)
    method = build_method(config, info.num_classes)
    chosen = choose_evaluation(config, method, evaluation)
    variables, source = load_eval_variables(config, method, workdir, which, chosen.predict)
    written = predict_folder(method.predict_fns()[chosen.predict], variables, input_dir, output_dir,
                             palette=visualize.palette_for(info.name, info.num_classes),
                             num_classes=info.num_classes, protocol=_covering(chosen.protocol),
                             crop_size=config.data.crop_size,
                             resize_multiple=config.eval.get("resize_multiple", RESIZE_MULTIPLE))
    print(f"wrote predictions of {len(written)} image(s) by {source} to {output_dir}")


def _covering(protocol: str) -> str:
    """`protocol`, or 'whole' when it does not cover the image (centre crop)."""
    from csl_jax.evaluation.protocols import get_protocol

    return protocol if get_protocol(protocol).covers_image else "whole"
