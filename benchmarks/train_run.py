r"""A real training run per compute dtype: loss curves side by side and the input-pipeline wait.

    python -m benchmarks.train_run --steps 300 --dtype float32 bfloat16 --workers 16 \
        --out DIR/train_run.json [--workdir-root DIR/train_run_work] [--timeout-s 900]
    python -m benchmarks.train_run --tiny [--workers 2]   # CPU smoke run: the demo model, 6 steps

Answers two questions: does bfloat16 compute train like float32, and what share of a real run's
wall time goes to waiting for the real input pipeline (Grain, `data.num_workers` processes)?

For each --dtype it runs the user path in a subprocess, `python main.py
--config=configs/demo.py:csl --workdir=ROOT/DTYPE --config.KEY=VALUE ...`, with the same seed for
every dtype: "the demo scaled up" -- DeepLabV3+ R50 at full width (`model.blocks=(3,4,6,3)`, which
is what `blocks=None` resolves to for depth 50; ml_collections cannot set a tuple field to None from
the command line), OS8 with ASPP 12/24/36 (CSL's setting), crop 321, TMP block 32, batch 8 + 8,
on the synthetic dataset at Pascal-like sizes (sides 375..500, 512 train / 32 val images),
`data.num_workers=--workers`, `optim.total_steps=--steps`, a log row every --log-every steps, one
evaluation (padded to one 500 x 500 shape, so it compiles once) and one checkpoint at the end. The
dataset is generated once, before the runs, into --data-root (default ROOT/data) by its own
subprocess (timed as `dataset.prep_s`) and reused. ROOT/DTYPE is deleted first: a stale run there
would be resumed. Each run's stdout/stderr go to ROOT/DTYPE.log; a failed run raises with the tail
of its stderr and names its workdir. --extra-override KEY=VALUE (repeatable) appends
`--config.KEY=VALUE` to every run.

Reported per dtype, from the run's `metrics.jsonl` (training rows: `loss`, `steps_per_sec`,
`data_wait` = share of the window's wall time the training loop spent getting the next batch from
the streams and copying it to the device) and `final_results.json`:

- `loss_curve` [[step, loss], ...] (each loss the mean over its logged window), `final_loss`;
- `val_miou` (and `best_miou`) of the final evaluation; `wall_s` of the whole subprocess;
- `steps_per_sec`, `data_wait_share`: means over the logged windows AFTER the first one. The first
  window is the run's first step (the trainer logs it on its own) and includes the start of the
  Grain workers (not compilation, which the trainer times apart and logs); its duration (steps / its speed)
  is `first_window_s`, and `data_wait_share_all` is the mean over all windows. Windows exclude
  evaluation and checkpoint time (the trainer restarts its timer). Steps are dispatched
  asynchronously, so the device may compute while the loop waits for data: a data wait near 0 means
  the input pipeline keeps up; compare steps/s with benchmarks/train_step.py (no pipeline).

And `comparison`: `max_abs_loss_diff` and `mean_rel_loss_diff` (|l_b - l_a| / |l_a|, a = the first
--dtype) over the steps logged by both runs. The table printed last has one row per logged step
that is a multiple of 50 (every row with --tiny), the losses side by side, then a summary line per
dtype. `device` is read in this process after the runs (so JAX does not hold the accelerator while
they run); `devices` is the device count the runs saw (their run_train.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/demo.py:csl"
DTYPES = ("float32", "bfloat16")

# "The demo scaled up": R50 full width, CSL's OS8 head, Pascal-like images and crop.
FULL_OVERRIDES = {
    "model.depth": 50, "model.blocks": (3, 4, 6, 3), "model.width": 64, "model.head_width": 256,
    "model.reduce_width": 48, "model.output_stride": 8, "model.aspp_rates": (12, 24, 36),
    "data.crop_size": 321, "data.block_size": 32, "batch.labeled": 8, "batch.unlabeled": 8,
    "eval.pad_to_multiple": 500,
}
FULL_DATASET = dict(num_train=512, num_val=32, image_size=(375, 500), seed=0)
# --tiny keeps the demo's model, crop and batch; only the dataset is smaller (faster to generate).
TINY_DATASET = dict(num_train=64, num_val=16, image_size=(80, 80), seed=0)
TABLE_EVERY = 50
STDERR_TAIL = 3000


# ---------------------------------------------------------------------------------------------
# Subprocesses
# ---------------------------------------------------------------------------------------------
def _env() -> dict:
    """This process's environment with the repository root on PYTHONPATH."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))


def _tail(path: str, chars: int = STDERR_TAIL) -> str:
    with open(path, errors="replace") as f:
        text = f.read()
    return text[-chars:]


def run_logged(cmd: list[str], log_base: str, timeout_s: float, what: str, workdir: str) -> float:
    """Runs `cmd` (cwd = repository root) with stdout/stderr in `log_base`.{out,err}; returns its wall
    seconds. Raises RuntimeError naming `what` and `workdir`, with the stderr tail, when it fails or
    runs past `timeout_s` (0 = no limit; its whole process group is killed)."""
    out_path, err_path = log_base + ".out", log_base + ".err"
    start = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=err, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s or None)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its Grain workers
            proc.wait()
            rc = None
        finally:
            if proc.poll() is None:  # interrupted: do not leave the run behind
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall_s = time.perf_counter() - start
    if rc != 0:
        status = f"timed out after {timeout_s:g} s" if rc is None else f"failed with exit code {rc}"
        raise RuntimeError(f"{what} {status} (workdir {workdir}; logs {out_path}, {err_path}); "
                           f"command: {' '.join(cmd)}\n--- stderr tail ---\n{_tail(err_path)}")
    return wall_s


def prepare_dataset(data_root: str, params: dict, log_base: str, timeout_s: float) -> float:
    """Generates the synthetic dataset into `data_root` in a subprocess (kept if already there); seconds."""
    os.makedirs(data_root, exist_ok=True)
    code = ("from data_prep import synthetic; import json, sys; "
            "p = json.loads(sys.argv[1]); p['image_size'] = tuple(p['image_size']); "
            "synthetic.prepare(sys.argv[2], **p)")
    cmd = [sys.executable, "-c", code, json.dumps(params), data_root]
    return run_logged(cmd, log_base, timeout_s, "dataset generation", data_root)


def _literal(value) -> str:
    """A config override value as main.py's flags parse it (tuples as '(a,b,c)')."""
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def config_overrides(args, dtype: str, data_root: str, dataset: dict) -> list[str]:
    """The `--config.KEY=VALUE` flags of one run (the --extra-override ones last)."""
    overrides = {} if args.tiny else dict(FULL_OVERRIDES)
    overrides.update({
        "seed": args.seed, "model.dtype": dtype, "data.root": data_root, "data.num_workers": args.workers,
        "optim.total_steps": args.steps, "log_every_steps": args.log_every, "eval.every_steps": args.steps,
        "checkpoint_every_steps": args.steps,
    })
    overrides.update({f"data.synthetic.{k}": v for k, v in dataset.items()})
    flags = [f"--config.{key}={_literal(value)}" for key, value in overrides.items()]
    for extra in args.extra_override:
        extra = extra[len("--config."):] if extra.startswith("--config.") else extra
        flags.append(f"--config.{extra}")
    return flags


# ---------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------
def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of `workdir`/metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val/miou" in r]


def summarize_run(workdir: str) -> dict:
    """The per-dtype numbers of the module docstring from a finished run's files."""
    train_rows, _ = read_metrics(workdir)
    if not train_rows:
        raise RuntimeError(f"no training rows in {workdir}/metrics.jsonl")
    with open(os.path.join(workdir, "final_results.json")) as f:
        final = json.load(f)
    with open(os.path.join(workdir, "run_train.json")) as f:
        devices = len(json.load(f)["devices"])
    waits = np.array([r["data_wait"] for r in train_rows], np.float64)
    speeds = np.array([r["steps_per_sec"] for r in train_rows], np.float64)
    later = slice(1, None) if len(train_rows) > 1 else slice(None)  # a single window: use it
    return {
        "workdir": workdir, "devices": devices,
        "loss_curve": [[int(r["step"]), float(r["loss"])] for r in train_rows],
        "final_loss": float(train_rows[-1]["loss"]),
        "val_miou": float(final["miou"]), "best_miou": float(final.get("best_miou", final["miou"])),
        "steps_per_sec": float(np.mean(speeds[later])),
        "data_wait_share": float(np.mean(waits[later])),
        "data_wait_share_all": float(np.mean(waits)),
        "first_window_s": float(train_rows[0]["step"] / speeds[0]),  # the run starts at step 0
        "num_windows": len(train_rows),
    }


def compare(reference: dict, other: dict) -> dict:
    """Loss differences of `other` vs `reference` at the steps both logged."""
    ref, oth = dict(map(tuple, reference["loss_curve"])), dict(map(tuple, other["loss_curve"]))
    steps = sorted(set(ref) & set(oth))
    a, b = np.array([ref[s] for s in steps]), np.array([oth[s] for s in steps])
    diff = np.abs(b - a)
    return {"steps": len(steps), "max_abs_loss_diff": float(diff.max()) if steps else None,
            "mean_rel_loss_diff": float(np.mean(diff / np.abs(a))) if steps else None,
            "final_loss_diff": float(b[-1] - a[-1]) if steps else None}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def print_table(report: dict) -> None:
    """Losses side by side, then one summary line per dtype (the last thing the benchmark prints)."""
    dtypes = list(report["runs"])
    curves = {d: dict(map(tuple, report["runs"][d]["loss_curve"])) for d in dtypes}
    steps = sorted(set().union(*curves.values()))
    last = steps[-1] if steps else None
    shown = [s for s in steps if report["tiny"] or s % TABLE_EVERY == 0 or s == last]
    ds = report["dataset"]
    print(f"device: {report['device']} x{report['devices']} (jax {report['jax']}); {report['steps']} steps, "
          f"{report['workers']} workers, dataset {ds['num_train']}+{ds['num_val']} images "
          f"{ds['image_size']} (generated in {ds['prep_s']:.1f} s); results in {report['out']}")
    header = f"{'step':>6}" + "".join(f" {d + ' loss':>15}" for d in dtypes)
    two = len(dtypes) == 2
    if two:
        header += f" {'diff':>9}"
    print(header)
    for s in shown:
        losses = [curves[d].get(s) for d in dtypes]
        line = f"{s:>6}" + "".join(f" {'n/a' if v is None else format(v, '.4f'):>15}" for v in losses)
        if two:
            line += f" {'n/a' if None in losses else format(losses[1] - losses[0], '+.4f'):>9}"
        print(line)
    for d in dtypes:
        r = report["runs"][d]
        print(f"{d:>9}: {r['steps_per_sec']:.2f} steps/s, data wait {100 * r['data_wait_share']:.1f}% "
              f"(all windows {100 * r['data_wait_share_all']:.1f}%), first window {r['first_window_s']:.1f} s, "
              f"val mIoU {100 * r['val_miou']:.2f}, wall {r['wall_s']:.1f} s")
    c = report["comparison"]
    if c:
        print(f"{dtypes[1]} vs {dtypes[0]}: max |loss diff| {c['max_abs_loss_diff']:.4f}, "
              f"mean relative {100 * c['mean_rel_loss_diff']:.2f}% over {c['steps']} logged steps")


def markdown(report: dict) -> str:
    """Loss curves side by side and the per-dtype summary as Markdown (for benchmarks/suite.py)."""
    dtypes = list(report["runs"])
    curves = {d: dict(map(tuple, report["runs"][d]["loss_curve"])) for d in dtypes}
    steps = sorted(set().union(*curves.values()))
    shown = [s for s in steps if report["tiny"] or s % TABLE_EVERY == 0 or s == steps[-1]]
    ds = report["dataset"]
    lines = [f"Training run: {report['steps']} steps, {report['workers']} data workers, synthetic dataset "
             f"{ds['num_train']} + {ds['num_val']} images of {ds['image_size']} ({report['device']}).", "",
             "| step | " + " | ".join(f"{d} loss" for d in dtypes) + " |", "|---|" + "---|" * len(dtypes)]
    lines += [f"| {s} | " + " | ".join("n/a" if curves[d].get(s) is None else f"{curves[d][s]:.4f}" for d in dtypes)
              + " |" for s in shown]
    lines += ["", "| dtype | steps/s | data wait (after the first window) | data wait (all) | first window s "
              "| val mIoU | wall s |", "|---|---|---|---|---|---|---|"]
    for d in dtypes:
        r = report["runs"][d]
        lines.append(f"| {d} | {r['steps_per_sec']:.2f} | {100 * r['data_wait_share']:.1f} % | "
                     f"{100 * r['data_wait_share_all']:.1f} % | {r['first_window_s']:.1f} | "
                     f"{100 * r['val_miou']:.2f} | {r['wall_s']:.1f} |")
    c = report["comparison"]
    if c:
        lines += ["", f"{dtypes[1]} vs {dtypes[0]}: max |loss difference| {c['max_abs_loss_diff']:.4f}, mean "
                  f"relative {100 * c['mean_rel_loss_diff']:.2f} % over {c['steps']} logged steps."]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="training steps per run (default 300; --tiny: 6)")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES,
                        help="compute dtypes, one run each; the first is the comparison's reference")
    parser.add_argument("--workers", type=int, help="config.data.num_workers (default 16; --tiny: 0)")
    parser.add_argument("--log-every", type=int, help="config.log_every_steps (default 10; --tiny: 2)")
    parser.add_argument("--seed", type=int, default=0, help="config.seed, the same for every dtype")
    parser.add_argument("--workdir-root", help="runs go to ROOT/<dtype> (default: next to --out, "
                        "<out without .json>_work)")
    parser.add_argument("--data-root", help="synthetic dataset dir (default ROOT/data; reused if there)")
    parser.add_argument("--extra-override", action="append", default=[], metavar="KEY=VALUE",
                        help="append --config.KEY=VALUE to every run (repeatable; "
                        "write --extra-override=--config.KEY=VALUE for the long form)")
    parser.add_argument("--timeout-s", type=float, default=0.0, help="per subprocess; 0 = no limit")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run: the demo's tiny model, crop and batch, 6 steps, log every 2, 0 workers")
    parser.add_argument("--out", default="train_run.json", help="JSON results file")
    args = parser.parse_args(argv)
    defaults = (6, 0, 2) if args.tiny else (300, 16, 10)
    for name, default in zip(("steps", "workers", "log_every"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.steps < 1 or args.log_every < 1 or args.workers < 0:
        parser.error("--steps and --log-every must be positive, --workers >= 0")
    if len(set(args.dtype)) != len(args.dtype):
        parser.error(f"--dtype repeats a dtype: {args.dtype}")
    args.workdir_root = os.path.abspath(args.workdir_root or os.path.splitext(args.out)[0] + "_work")
    args.data_root = os.path.abspath(args.data_root or os.path.join(args.workdir_root, "data"))
    return args


def main(argv=None) -> dict:
    """Generates the dataset, trains once per dtype, returns the report written to --out."""
    args = parse_args(argv)
    dataset = dict(TINY_DATASET if args.tiny else FULL_DATASET)
    os.makedirs(args.workdir_root, exist_ok=True)
    print(f"dataset {dataset} -> {args.data_root}", flush=True)
    prep_s = prepare_dataset(args.data_root, dataset, os.path.join(args.workdir_root, "dataset_prep"),
                             args.timeout_s)
    runs = {}
    for dtype in args.dtype:
        workdir = os.path.join(args.workdir_root, dtype)
        shutil.rmtree(workdir, ignore_errors=True)  # a stale run there would be resumed
        os.makedirs(workdir)
        cmd = [sys.executable, "main.py", f"--config={CONFIG}", f"--workdir={workdir}",
               *config_overrides(args, dtype, args.data_root, dataset)]
        log_base = os.path.join(args.workdir_root, dtype)
        print(f"{dtype}: training {args.steps} steps in {workdir} (log {log_base}.err)", flush=True)
        wall_s = run_logged(cmd, log_base, args.timeout_s, f"{dtype} training run", workdir)
        runs[dtype] = dict(summarize_run(workdir), wall_s=wall_s, command=cmd)
        print(json.dumps({k: v for k, v in runs[dtype].items() if k not in ("loss_curve", "command")}), flush=True)

    import jax  # only now: the runs had the accelerator to themselves

    device = jax.devices()[0]
    report = {
        "device": f"{device.platform}: {device.device_kind}", "devices": runs[args.dtype[0]]["devices"],
        "jax": jax.__version__, "tiny": args.tiny, "steps": args.steps, "workers": args.workers,
        "log_every": args.log_every, "seed": args.seed, "config": CONFIG,
        "workdir_root": args.workdir_root, "out": args.out,
        "dataset": dict(dataset, image_size=list(dataset["image_size"]), root=args.data_root, prep_s=prep_s),
        "runs": runs,
        "comparison": compare(runs[args.dtype[0]], runs[args.dtype[1]]) if len(args.dtype) == 2 else None,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
