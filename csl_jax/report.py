"""Results tables generated from training workdirs, never typed by hand.

    python -m csl_jax.report RUN_DIR... [--select final|best] [--diag KEY[,KEY]] [--diag-steps K] [--per-class]
                             [--out DIR]

A RUN_DIR is a workdir (recognised by its config.json, see csl_jax.workdir) or a folder with
workdirs below it. Per workdir the report reads:

    config.json          the run's config: method, dataset, split, seed and the recipe
    final_results.json   written by a finished run: 'evaluations' ({evaluation name: mIoU fraction})
                         and 'evaluation' (the one that picks the best checkpoint)
    eval_results.jsonl   every evaluation at every evaluation step ('step', 'evaluation', 'miou',
                         'iou_per_class' {class name: IoU fraction})
    metrics.jsonl        the training scalars of every logged step (diagnostics)
    checkpoints/<step>/  where an unfinished run resumes
    .lock                present while a training run holds the workdir

Runs are grouped by (config.data.name, config.data.split, method label), the label being
config.method.variant when the config has one (prefixed with config.method.name unless it starts
with it: UniMatch V2's 'csl' is 'unimatch_v2_csl') and config.method.name otherwise; seeds
(config.seed) are the replicates. Runs of one group whose configs differ in a setting outside
NOT_RECIPE (seed, data reading, logging, checkpointing, evaluation batch and plots) are not merged:
the group is split by the values of the differing settings, each part labelled
`method (key=value, ...)` (`method (recipe <hash>)` for more than MAX_SHOWN_KEYS keys), and a
warning on stderr names the keys. Only finished runs (with final_results.json) enter the means;
unfinished ones are listed under the table with the step they reached.

Printed: the command line, a caption line, the Markdown table (mIoU in %, `mean ± std (n)` over
seeds, sample std with ddof=1; one seed shows its value alone), the unfinished runs. --per-class
adds, per dataset and evaluation column, a table of the per-class IoU beside the mIoU of the same
evaluation records (eval_results.jsonl: the final step's, or with --select best the best one's),
classes named and ordered as the dataset's. With --out DIR: DIR/report.json (the aggregated
table, mIoU as fractions; 'per_class' with --per-class) and DIR/miou_over_steps.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import sys
from collections.abc import Iterable, Sequence

import numpy as np

from csl_jax import workdir as workdir_lib

FINAL_RESULTS = "final_results.json"  # csl_jax.train.FINAL_RESULTS (not imported: that module pulls in jax)
EVAL_RESULTS = "eval_results.jsonl"
METRICS = "metrics.jsonl"
#: Settings that cannot change a run's numbers: runs differing only in these are one recipe.
NOT_RECIPE = frozenset({"seed", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "stop_after_steps",
                        "compilation_cache_dir", "eval.batch_size", "eval.num_plot_images",
                        *workdir_lib.RUNTIME_KEYS})
#: Logged by the pseudo-labelling methods (csl_jax/methods/parts/passes.py); shown when present.
DEFAULT_DIAG = ("mask_ratio", "pl_acc_reliable", "pl_acc_rest")
MAX_SHOWN_KEYS = 3
ABSENT = "(absent)"  # the value of a setting a run's config lacks (a config of an older csl_jax)
PLOT_FILE = "miou_over_steps.png"
JSON_FILE = "report.json"


class ReportError(ValueError):
    """Bad input to the report (a missing folder, a corrupt file); the message names it."""


# ---------------------------------------------------------------------------------------------
# Reading workdirs
# ---------------------------------------------------------------------------------------------
def find_workdirs(path: str) -> list[str]:
    """[path] when `path` is a workdir, else every workdir below it (sorted); ReportError when none."""
    if not os.path.isdir(path):
        raise ReportError(f"{path}: no such folder")
    if os.path.exists(os.path.join(path, workdir_lib.CONFIG_FILE)):
        return [path]
    found = []
    for folder, subfolders, files in os.walk(path):
        subfolders.sort()
        if workdir_lib.CONFIG_FILE in files:
            found.append(folder)
            subfolders.clear()  # a workdir's own folders hold no runs
    if not found:
        raise ReportError(f"{path}: no workdir (a folder with {workdir_lib.CONFIG_FILE}) in it")
    return found


def read_json(path: str):
    """The JSON value in file `path`; ReportError naming the file when it is not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ReportError(f"{path} is not valid JSON ({error})") from error


def read_jsonl(path: str) -> list[dict]:
    """The records of JSONL file `path` ([] when absent). A torn last line (a killed run) is dropped;
    any other bad line is a ReportError naming the file and line."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ReportError(f"{path} line {number} is not valid JSON ({error})") from error
    return records


@dataclasses.dataclass
class Run:
    """One workdir. `config`: flat {'method.name': 'csl', ...}; `final`: final_results.json (None
    when the run did not finish); `evals`, `metrics`: the records of eval_results.jsonl, metrics.jsonl."""

    workdir: str
    config: dict
    final: dict | None
    evals: list[dict]
    metrics: list[dict]
    checkpoint: int | None  # latest train-state checkpoint (where a resume starts)
    locked: bool  # WORKDIR/.lock exists: a training run holds the workdir (or died holding it)

    @property
    def method(self) -> str:
        """config.method.variant, which names its method (e.g. 'csl_released', 'u2pl_intended'); a variant
        that does not ('csl' of unimatch_v2) is prefixed with the method: 'unimatch_v2_csl'; else the name."""
        name, variant = self.config["method.name"], self.config.get("method.variant")
        if not variant:
            return name
        return variant if variant.startswith(name) else f"{name}_{variant}"

    @property
    def seed(self) -> int:
        return self.config["seed"]

    @property
    def step(self) -> int:
        """The last step the run reached (its final step, else the last one logged or checkpointed)."""
        if self.final is not None:
            return self.final["step"]
        return max([r["step"] for r in self.metrics] + [self.checkpoint or 0])

    def label(self, evaluation: str) -> str:
        """Column label of evaluation `evaluation` ('teacher', 'model@test:sliding'): 'PREDICT SPLIT',
        plus the protocol when it is not the run's config.eval.protocol."""
        from csl_jax.evaluation.loop import parse_evaluation

        protocol = self.config.get("eval.protocol", "")
        e = parse_evaluation(evaluation, protocol)
        return f"{e.predict} {e.split}" + ("" if e.protocol == protocol else f" {e.protocol}")

    def values(self, select: str) -> dict[str, float]:
        """{column label: mIoU fraction} of a finished run: its final evaluation ('final') or the
        best value over its evaluation steps ('best')."""
        final_path = os.path.join(self.workdir, FINAL_RESULTS)
        if not isinstance(self.final.get("evaluations"), dict) or "evaluation" not in self.final:
            raise ReportError(f"{final_path} lacks 'evaluations' ({{evaluation name: mIoU}}) or 'evaluation' (the "
                              "one that picks the best checkpoint); it was written by an older csl_jax")
        if select == "final":
            return {self.label(name): float(v) for name, v in self.final["evaluations"].items()}
        out = {}
        for name in self.final["evaluations"]:
            mious = [r["miou"] for r in self.evals if r.get("evaluation") == name]
            if not mious:
                raise ReportError(f"{os.path.join(self.workdir, EVAL_RESULTS)} has no record of evaluation {name!r}, "
                                  "which --select best needs")
            out[self.label(name)] = float(max(mious))
        return out

    def class_ious(self, select: str) -> dict[str, dict]:
        """{column label: the eval_results.jsonl record of that evaluation whose values `values(select)`
        reports}: the record at the final step ('final') or the first with the highest mIoU ('best').
        ReportError naming the file when it lacks the record or its 'iou_per_class'."""
        out = {}
        for name in self.final["evaluations"]:
            records = [r for r in self.evals if r.get("evaluation") == name]
            if select == "final":
                records = [r for r in records if r["step"] == self.final["step"]][-1:]
            else:
                records = [max(records, key=lambda r: r["miou"])] if records else []
            if not records or not isinstance(records[0].get("iou_per_class"), dict):
                at = f"at step {self.final['step']}" if select == "final" else "over the run"
                raise ReportError(f"{os.path.join(self.workdir, EVAL_RESULTS)} has no 'iou_per_class' of evaluation "
                                  f"{name!r} {at}, which --per-class needs")
            out[self.label(name)] = records[0]
        return out

    def curve(self, label: str) -> dict[int, float]:
        """{step: mIoU fraction} of the evaluation with column label `label` (the last record per step)."""
        return {r["step"]: float(r["miou"]) for r in self.evals
                if "evaluation" in r and self.label(r["evaluation"]) == label}

    def diagnostic(self, key: str, last_steps: int) -> float | None:
        """Mean of metrics.jsonl's `key` over the records of the last `last_steps` steps (None when not logged)."""
        records = [r for r in self.metrics if key in r]
        if not records:
            return None
        last = max(r["step"] for r in records)
        return float(np.mean([r[key] for r in records if r["step"] > last - last_steps]))


def load_run(workdir: str) -> Run:
    """The Run of `workdir` (which holds config.json); ReportError naming a corrupt file."""
    try:
        config = workdir_lib.load_config(os.path.join(workdir, workdir_lib.CONFIG_FILE))
    except ValueError as error:
        raise ReportError(str(error)) from error
    final_path = os.path.join(workdir, FINAL_RESULTS)
    final = read_json(final_path) if os.path.exists(final_path) else None
    if final is not None and not isinstance(final, dict):
        raise ReportError(f"{final_path} holds a JSON {type(final).__name__}, not a run's results (an object)")
    steps = workdir_lib.checkpoint_steps(workdir, "checkpoints")
    return Run(workdir=workdir, config=workdir_lib.flatten(config), final=final,
               evals=read_jsonl(os.path.join(workdir, EVAL_RESULTS)),
               metrics=read_jsonl(os.path.join(workdir, METRICS)), checkpoint=steps[-1] if steps else None,
               locked=os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE)))


# ---------------------------------------------------------------------------------------------
# Grouping and aggregation
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Group:
    """The runs of one table row: one dataset, split and recipe; `recipe` holds the settings that
    told this group apart from other runs of its method ({} when none did)."""

    dataset: str
    split: str
    method: str
    recipe: dict
    runs: list[Run]

    @property
    def label(self) -> str:
        if not self.recipe:
            return self.method
        if len(self.recipe) > MAX_SHOWN_KEYS:
            digest = hashlib.sha1(json.dumps(sorted(self.recipe.items()), default=str).encode()).hexdigest()[:6]
            return f"{self.method} (recipe {digest})"
        return f"{self.method} ({', '.join(f'{k}={v}' for k, v in self.recipe.items())})"

    @property
    def finished(self) -> list[Run]:
        return sorted((r for r in self.runs if r.final is not None), key=lambda r: (r.seed, r.workdir))

    @property
    def unfinished(self) -> list[Run]:
        return sorted((r for r in self.runs if r.final is None), key=lambda r: (r.seed, r.workdir))


def recipe_differences(configs: Sequence[dict]) -> list[str]:
    """Sorted flat keys, outside NOT_RECIPE, whose values are not the same in all `configs`."""
    keys = set().union(*configs) - NOT_RECIPE
    return sorted(k for k in keys if len({json.dumps(c.get(k, ABSENT)) for c in configs}) > 1)


def group_runs(runs: Iterable[Run]) -> tuple[list[Group], list[str]]:
    """(groups sorted by dataset, split, label; warnings). Runs of one dataset, split and method
    whose recipes differ are split into one group per recipe (see the module docstring)."""
    by_method: dict[tuple, list[Run]] = {}
    for run in runs:
        by_method.setdefault((run.config["data.name"], run.config["data.split"], run.method), []).append(run)
    groups, warnings = [], []
    for (dataset, split, method), members in by_method.items():
        keys = recipe_differences([r.config for r in members])
        if keys:
            warnings.append(f"{dataset} {split} {method}: the runs differ in "
                            f"{', '.join('config.' + k for k in keys)}; not averaged together, one row per recipe")
        parts: dict[tuple, list[Run]] = {}
        for run in members:
            parts.setdefault(tuple(json.dumps(run.config.get(k, ABSENT)) for k in keys), []).append(run)
        for part in parts.values():
            recipe = {k: part[0].config.get(k, ABSENT) for k in keys}
            groups.append(Group(dataset, split, method, recipe, part))
    for group in groups:
        seeds = [r.seed for r in group.finished]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            warnings.append(f"{group.dataset} {group.split} {group.label}: seed(s) {repeated} finished in more than "
                            f"one workdir ({', '.join(r.workdir for r in group.finished if r.seed in repeated)}); "
                            "each counts as a replicate")
    groups.sort(key=lambda g: (g.dataset, g.split, g.label))
    return groups, warnings


def summarize(values: Sequence[float]) -> dict:
    """{'mean', 'std' (sample, ddof=1; None for one value), 'n'} of `values`."""
    x = np.asarray(values, np.float64)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else None, "n": len(x)}


def aggregate(groups: Sequence[Group], select: str, diag: Sequence[str], diag_steps: int) -> dict:
    """The table as JSON-ready data: 'columns' (evaluation labels, first-seen order), 'diagnostics',
    'rows' (one per group with a finished run: cells {label: summarize(...) + 'seeds'}, the
    checkpoint-picking evaluation 'per_seed', 'diagnostics' {key: summarize(...)}), 'unfinished'."""
    columns, rows, unfinished = [], [], []
    for group in groups:
        for run in group.unfinished:
            total = run.config.get("optim.total_steps") or f"{run.config.get('optim.epochs')} epochs"
            unfinished.append({"dataset": group.dataset, "split": group.split, "method": group.label,
                               "seed": run.seed, "workdir": run.workdir, "step": run.step, "of": total,
                               "checkpoint": run.checkpoint, "locked": run.locked})
        if not group.finished:
            continue
        per_run = [run.values(select) for run in group.finished]
        cells = {}
        for values in per_run:
            for label in values:
                if label not in columns:
                    columns.append(label)
                if label not in cells:
                    seeds = [{"seed": run.seed, "miou": v[label], "workdir": run.workdir}
                             for run, v in zip(group.finished, per_run) if label in v]
                    cells[label] = dict(summarize([s["miou"] for s in seeds]), seeds=seeds)
        first = group.finished[0]
        picks = first.label(first.final["evaluation"])
        diagnostics = {}
        for key in diag:
            got = [v for v in (run.diagnostic(key, diag_steps) for run in group.finished) if v is not None]
            if got:
                diagnostics[key] = summarize(got)
        rows.append({"dataset": group.dataset, "split": group.split, "method": group.label,
                     "recipe": group.recipe,
                     "workdirs": [run.workdir for run in group.finished], "cells": cells, "per_seed": picks,
                     "diagnostics": diagnostics, "unfinished": len(group.unfinished)})
    return {"select": select, "unit": "fraction", "columns": columns, "diagnostics": list(diag),
            "diag_steps": diag_steps, "rows": rows, "unfinished": unfinished}


def per_class(groups: Sequence[Group], select: str) -> list[dict]:
    """Per-class tables as JSON-ready data, one per (dataset, evaluation label) in first-seen order:
    'dataset', 'evaluation', 'classes' (names in the records' order), 'rows' (one per group with a
    finished run: 'split', 'method', 'miou' and 'classes' {name: summarize(...)} over its seeds)."""
    tables: dict[tuple, dict] = {}
    for group in groups:
        per_run = [run.class_ious(select) for run in group.finished]
        for label in dict.fromkeys(label for records in per_run for label in records):
            records = [r[label] for r in per_run if label in r]
            names = list(dict.fromkeys(c for record in records for c in record["iou_per_class"]))
            table = tables.setdefault((group.dataset, label),
                                      {"dataset": group.dataset, "evaluation": label, "classes": [], "rows": []})
            table["classes"] += [c for c in names if c not in table["classes"]]
            table["rows"].append({"split": group.split, "method": group.label,
                                  "miou": summarize([r["miou"] for r in records]),
                                  "classes": {c: summarize([r["iou_per_class"][c] for r in records
                                                            if c in r["iou_per_class"]]) for c in names}})
    return list(tables.values())


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def format_cell(cell: dict, scale: float = 100.0, digits: int = 2) -> str:
    """'mean ± std (n)' of `cell` (summarize's dict) times `scale`; the value alone when n = 1."""
    if cell["n"] == 1:
        return f"{scale * cell['mean']:.{digits}f}"
    return f"{scale * cell['mean']:.{digits}f} ± {scale * cell['std']:.{digits}f} ({cell['n']})"


def caption(table: dict) -> str:
    """The line above the table that says what its numbers are."""
    which = ("final evaluation (final_results.json)" if table["select"] == "final"
             else "best evaluation over the run (max of eval_results.jsonl)")
    text = (f"mIoU (%) of each finished run's {which}: mean ± sample std (n seeds) over seeds; 'per seed': the "
            "evaluation that picks the best checkpoint (config.eval.best)")
    if table["diagnostics"]:
        text += (f"; {', '.join(table['diagnostics'])}: metrics.jsonl mean over each run's last "
                 f"{table['diag_steps']} steps, then over seeds")
    return text + "."


def markdown(table: dict) -> str:
    """The Markdown table of `aggregate`'s dict, with the list of unfinished runs under it."""
    header = ["dataset", "split", "method", *table["columns"], "per seed", *table["diagnostics"], "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        cells = [format_cell(row["cells"][c]) if c in row["cells"] else "-" for c in table["columns"]]
        seeds = ", ".join(f"s{s['seed']} {100 * s['miou']:.2f}" for s in row["cells"][row["per_seed"]]["seeds"])
        if len(row["cells"]) > 1:
            seeds = f"{row['per_seed']}: {seeds}"
        diag = [format_cell(row["diagnostics"][k], scale=1.0, digits=3) if k in row["diagnostics"] else "-"
                for k in table["diagnostics"]]
        runs = str(len(row["workdirs"])) + (f" (+{row['unfinished']} unfinished)" if row["unfinished"] else "")
        fields = [row["dataset"], row["split"], row["method"], *cells, seeds, *diag, runs]
        lines.append("| " + " | ".join(fields) + " |")
    if table["unfinished"]:
        lines += ["", "Unfinished runs (not in the means):"]
        for u in table["unfinished"]:
            checkpoint = f", checkpoint {u['checkpoint']}" if u["checkpoint"] is not None else ", no checkpoint"
            locked = ", locked by a training run (in progress, or it died)" if u["locked"] else ""
            lines.append(f"- `{u['workdir']}`: {u['dataset']} {u['split']} {u['method']} seed {u['seed']}, "
                         f"step {u['step']} of {u['of']}{checkpoint}{locked}")
    return "\n".join(lines)


def per_class_markdown(tables: Sequence[dict], select: str) -> str:
    """The Markdown of `per_class`'s tables: a caption line and a table each (IoU in %, `mean ± std (n)`)."""
    which = "the final step's" if select == "final" else "the best one's"
    blocks = []
    for table in tables:
        header = ["split", "method", "mIoU", *table["classes"]]
        lines = [f"Per-class IoU (%) of {table['dataset']} `{table['evaluation']}`, {which} evaluation record "
                 "(eval_results.jsonl): mean ± sample std (n seeds) over seeds.", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in table["rows"]:
            cells = [format_cell(row["classes"][c]) if c in row["classes"] else "-" for c in table["classes"]]
            lines.append("| " + " | ".join([row["split"], row["method"], format_cell(row["miou"]), *cells]) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot_curves(groups: Sequence[Group], path: str) -> None:
    """PNG at `path`: mIoU (%) over steps, one subplot per evaluation label, one colour per group:
    a thick line of the mean over the finished seeds (at the steps all of them evaluated), thin
    lines per finished seed, dotted ones with x markers for unfinished runs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(run.label(r["evaluation"]) for g in groups for run in g.runs for r in run.evals
                                if "evaluation" in r))
    if not labels:
        raise ReportError("no run has evaluation records (eval_results.jsonl) to plot")
    several = len({(g.dataset, g.split) for g in groups}) > 1
    fig = Figure(figsize=(5.5 * len(labels), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    for i, label in enumerate(labels):
        ax = fig.add_subplot(1, len(labels), i + 1)
        for g_index, group in enumerate(groups):
            color = f"C{g_index % 10}"
            name = f"{group.dataset} {group.split} {group.label}" if several else group.label
            curves = [run.curve(label) for run in group.finished]
            for curve in curves:
                ax.plot(sorted(curve), [100 * curve[s] for s in sorted(curve)], color=color, lw=0.8, alpha=0.4)
            for run in group.unfinished:
                curve = run.curve(label)
                ax.plot(sorted(curve), [100 * curve[s] for s in sorted(curve)], color=color, lw=0.8, ls=":",
                        marker="x", ms=4)
            common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if common:
                ax.plot(common, [100 * np.mean([c[s] for c in curves]) for s in common], color=color, lw=2,
                        marker="o", ms=3, label=f"{name} (n={len(curves)})")
        ax.set(title=label, xlabel="step", ylabel="mIoU (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m csl_jax.report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a workdir, or a folder with workdirs below it")
    parser.add_argument("--select", choices=("final", "best"), default="final",
                        help="each run's final evaluation (final_results.json), or its best over the run")
    parser.add_argument("--diag", default=None,
                        help="comma-separated metrics.jsonl keys to average over the last --diag-steps steps "
                             f"(default: those of {','.join(DEFAULT_DIAG)} that some run logs; '' for none)")
    parser.add_argument("--diag-steps", type=int, default=100, help="steps the diagnostics average over")
    parser.add_argument("--per-class", action="store_true",
                        help="add a per-class IoU table per dataset and evaluation (mean ± std over seeds)")
    parser.add_argument("--out", default="", help=f"folder for {JSON_FILE} and {PLOT_FILE}")
    return parser.parse_args(argv)


def diag_keys(requested: str | None, runs: Sequence[Run]) -> list[str]:
    """The diagnostics columns: the requested keys (ReportError for one no finished run logs), or
    by default the DEFAULT_DIAG keys some finished run logs."""
    logged = {k for run in runs if run.final is not None for r in run.metrics for k in r}
    if requested is None:
        return [k for k in DEFAULT_DIAG if k in logged]
    keys = [k.strip() for k in requested.split(",") if k.strip()]
    missing = [k for k in keys if k not in logged]
    if missing:
        raise ReportError(f"--diag {','.join(missing)}: no finished run's {METRICS} has it; logged keys: "
                          f"{', '.join(sorted(logged - {'step', 'time'}))}")
    return keys


def report(argv: Sequence[str]) -> tuple[str, dict]:
    """(the printed text: command, caption, table; the aggregated table) of command-line `argv`.
    Writes --out files; warnings go to stderr."""
    args = parse_args(argv)
    if args.diag_steps < 1:
        raise ReportError(f"--diag-steps={args.diag_steps}: expected a positive number of steps")
    workdirs = list(dict.fromkeys(w for path in args.run_dirs for w in find_workdirs(path)))
    runs = [load_run(w) for w in workdirs]
    groups, warnings = group_runs(runs)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not any(g.finished for g in groups):
        print("warning: no run has finished; the table is empty", file=sys.stderr)
    table = aggregate(groups, args.select, diag_keys(args.diag, runs), args.diag_steps)
    command = "python -m csl_jax.report " + shlex.join(argv)
    table.update(command=command, caption=caption(table), warnings=warnings)
    text = f"$ {command}\n\n{table['caption']}\n\n{markdown(table)}"
    if args.per_class:
        table["per_class"] = per_class(groups, args.select)
        text += "\n\n" + per_class_markdown(table["per_class"], args.select)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, JSON_FILE), "w") as f:
            json.dump(table, f, indent=1)
        plot_curves(groups, os.path.join(args.out, PLOT_FILE))
    return text, table


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the report of `argv` (default sys.argv[1:]); returns 0, or 2 after a one-line error."""
    try:
        text, _ = report(sys.argv[1:] if argv is None else list(argv))
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
