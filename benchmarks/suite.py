r"""The GPU benchmark suite: one prepared command, run in order of value within a time budget.

    python -m benchmarks.suite --budget-s 480 --out DIR        # on the GPU (docs/performance.md)
    python -m benchmarks.suite --tiny --out DIR                # CPU smoke run of every part (a test)

Parts, in order of value (each is one or more benchmark processes):

1. `train_step_513`: the CSL and UniMatch train steps, R101 OS16 crop 513, 8 + 8, bf16, with the
   PyTorch reference (bf16 autocast + channels_last, and float32 = its TF32 default) in the same run: ms/step,
   images/s, `mfu_reference` against the bf16 peak measured in the same process, both speed-ups;
   then, in a process of its own compiled from the persistent cache, a jax.profiler trace of 3 CSL
   steps and its summary (benchmarks/profile_summary.py).
2. `compile`: lower + compile of the same steps, cold (part 1, empty persistent cache) and warm
   (a new process reading the persistent cache part 1 filled).
3. `csl_configs`: CSL's own configs at 8 + 8 bf16, one process each so that the peak memory is
   theirs: OS8 crop 321 (Pascal) and OS8 crop 801 with remat (Cityscapes).
4. `dtype`: the part 1 CSL step in float32 next to bf16; a 300-step synthetic-data training run
   (the demo scaled up: R50, crop 321) in both dtypes through the real pipeline with 16 workers:
   loss curves side by side and the data-wait share (benchmarks/train_run.py).
5. `model`: the model alone, OS8 vs OS16 time ratio (benchmarks/model_forward.py), and XLA's
   dilated-convolution check (benchmarks/dilated_conv.py).
6. `eval`: exact whole-image evaluation of images of several sizes in COCO-like order with UniMatch
   V1's COCO model (Xception-65 OS16, 81 classes): programs compiled, images/s and dummy batch slots
   of consecutive grouping vs shape buckets (benchmarks/eval_scale.py).

`--parts` picks the parts and their order (`--parts 4 5 3` finishes a run that ran out of budget).
Each process gets the time left of the budget; one still running when the budget is spent is
stopped (its process group gets SIGTERM, then SIGKILL) and recorded as `stopped`, the jobs after
it as `skipped`. Every part writes `partN_<name>.json` (the reports of its processes and their
status) and `partN_<name>.md` (its tables) into --out, with each process's log under
`logs/`; `suite.json` / `suite.md` index them and check the performance targets (issue 16). The
Markdown of the whole suite is printed last.

The parent process never initialises JAX (the children need the accelerator's memory); each
child runs with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 unless the environment sets it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Callable

from benchmarks import profile_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# issue 16's targets (R101 OS16, 8 + 8, bf16, one GPU)
TARGET_MFU = 0.35
TARGET_VS_TORCH_BF16 = 1.5
TARGET_VS_TORCH_TF32 = 2.5  # issue 27: PyTorch's float32 default runs its convs in TF32
TARGET_COMPILE_S = 60.0
TARGET_DATA_WAIT = 0.05
PROFILE_STEPS = 3


@dataclasses.dataclass
class Job:
    """One benchmark process: `python -m <module> <args> --out <out_dir>/<name>.json`."""
    name: str
    module: str
    args: list[str]
    status: str = "pending"  # ok | failed (exit N) | stopped (budget spent) | skipped (budget spent)
    seconds: float = 0.0
    report: dict | None = None


@dataclasses.dataclass
class Part:
    number: int
    name: str
    title: str
    jobs: list[Job]
    render: Callable[["Suite", "Part"], str]

    @property
    def stem(self) -> str:
        return f"part{self.number}_{self.name}"

    def job(self, name: str) -> Job | None:
        return next((j for j in self.jobs if j.name == name), None)

    def report(self, name: str) -> dict | None:
        job = self.job(name)
        return job.report if job else None


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
def plan(args) -> list[Part]:
    """The parts selected by --parts, with their jobs' command-line arguments."""
    cache = os.path.join(args.out, "xla_cache")
    profile = os.path.join(args.out, "profile")
    tiny = ["--tiny"] if args.tiny else []
    step = [*tiny, "--depth", "101", "--output-stride", "16", "--crop", "33" if args.tiny else "513"]
    short = ["--warmup", "2", "--iters", "5"]  # compile time dominates these; the median of 5 is enough
    os8 = [*tiny, "--method", "csl", "--depth", "101", "--output-stride", "8", "--dtype", "bfloat16",
           "--compilation-cache", cache, *short]
    parts = [
        Part(1, "train_step_513", "CSL and UniMatch train steps vs PyTorch (R101 OS16 crop 513, 8 + 8, bf16)",
             [Job("train_step", "benchmarks.train_step",
                  [*step, "--method", "csl", "unimatch", "--dtype", "bfloat16", "--torch",
                   "--compilation-cache", cache]),
              # its own process (a profiler failure cannot cost the measurements), compiled from the cache
              Job("profile", "benchmarks.train_step",
                  [*step, "--method", "csl", "--dtype", "bfloat16", "--compilation-cache", cache,
                   "--profile-dir", profile, "--warmup", "1", "--iters", "2", "--profile-steps", str(PROFILE_STEPS)])],
             render_part1),
        Part(2, "compile", "Compile time (lower + compile), cold and with the persistent cache",
             [Job("warm", "benchmarks.train_step",
                  [*step, "--method", "csl", "unimatch", "--dtype", "bfloat16", "--compile-only",
                   "--compilation-cache", cache])],
             render_part2),
        Part(3, "csl_configs", "CSL's own configs (OS8, 8 + 8, bf16): step time and peak memory",
             [Job("os8_321", "benchmarks.train_step", [*os8, "--crop", "33" if args.tiny else "321"]),
              Job("os8_801_remat", "benchmarks.train_step", [*os8, "--crop", "49" if args.tiny else "801", "--remat"])],
             render_part3),
        Part(4, "dtype", "float32 vs bf16: the CSL step, and a 300-step training run on the real pipeline",
             [Job("step_float32", "benchmarks.train_step",
                  [*step, "--method", "csl", "--dtype", "float32", "--compilation-cache", cache, *short]),
              Job("train_run", "benchmarks.train_run",
                  [*tiny, "--dtype", "float32", "bfloat16", "--workdir-root", os.path.join(args.out, "train_run")]
                  + ([] if args.tiny else ["--steps", "300", "--workers", "16"]))],
             render_part4),
        Part(5, "model", "The model alone (OS8 vs OS16) and XLA's dilated convolutions",
             [Job("model_forward", "benchmarks.model_forward",
                  tiny or ["--depth", "101", "--output-stride", "16", "8", "--crop", "513", "--dtype", "bfloat16"]),
              Job("dilated_conv", "benchmarks.dilated_conv", tiny or ["--sizes", "33", "65"])],
             render_part5),
        Part(6, "eval", "Exact whole-image evaluation of many image sizes (Xception-65 OS16, 81 classes)",
             [Job("eval_scale", "benchmarks.eval_scale",
                  ["--quick"] if args.tiny else ["--model", "full", "--images", "64", "--distinct", "1",
                                                 "--groupings", "consecutive", "buckets"])],
             render_part6),
    ]
    return [p for number in args.parts for p in parts if p.number == number]  # in the order given


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
class Suite:
    """Runs the plan within the budget and writes the reports."""

    def __init__(self, args):
        self.args = args
        self.parts = plan(args)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        self.env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
        os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run_job(self, job: Job) -> None:
        """Runs `job` with the time left; sets its status, seconds and report."""
        left = self.remaining()
        if left < self.args.min_job_s:
            job.status = "skipped (budget spent)"
            return
        out = os.path.join(self.args.out, f"{job.name}.json")
        log_path = os.path.join(self.args.out, "logs", f"{job.name}.log")
        cmd = [sys.executable, "-m", job.module, *job.args, "--out", out]
        print(f"[suite {time.monotonic() - self.start:6.0f} s] {job.name}: {' '.join(cmd[1:])}", flush=True)
        start = time.monotonic()
        with open(log_path, "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=left)
                job.status = "ok" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                stop_process_group(proc)
                job.status = "stopped (budget spent)"
        job.seconds = time.monotonic() - start
        if job.status == "ok":
            with open(out) as f:
                job.report = json.load(f)
        else:
            with open(log_path) as f:
                tail = f.read()[-2000:]
            print(f"[suite] {job.name} {job.status}; log {log_path}:\n{tail}", flush=True)
        print(f"[suite {time.monotonic() - self.start:6.0f} s] {job.name}: {job.status} in {job.seconds:.0f} s",
              flush=True)

    def run(self) -> dict:
        """Runs every part's jobs in order, writes each part's files, then suite.json / suite.md."""
        for part in self.parts:
            for job in part.jobs:
                self.run_job(job)
                if job.name == "profile" and job.status == "ok":
                    summarize_profiles(self, job)
            self.write_part(part)
        return self.write_index()

    def write_part(self, part: Part) -> None:
        record = {"number": part.number, "name": part.name, "title": part.title,
                  "jobs": [dataclasses.asdict(j) for j in part.jobs]}
        with open(os.path.join(self.args.out, f"{part.stem}.json"), "w") as f:
            json.dump(record, f, indent=2)
        with open(os.path.join(self.args.out, f"{part.stem}.md"), "w") as f:
            f.write(part_markdown(self, part))

    def write_index(self) -> dict:
        index = {
            "budget_s": self.args.budget_s, "elapsed_s": time.monotonic() - self.start, "tiny": self.args.tiny,
            "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "gpu": gpu_description()},
            "parts": [{"number": p.number, "name": p.name, "file": f"{p.stem}.json",
                       "jobs": {j.name: {"status": j.status, "seconds": round(j.seconds, 1)} for j in p.jobs}}
                      for p in self.parts],
            "targets": targets(self),
        }
        with open(os.path.join(self.args.out, "suite.json"), "w") as f:
            json.dump(index, f, indent=2)
        markdown = suite_markdown(self, index)
        with open(os.path.join(self.args.out, "suite.md"), "w") as f:
            f.write(markdown)
        return index

    def part(self, number: int) -> Part | None:
        return next((p for p in self.parts if p.number == number), None)

    def report(self, number: int, job: str) -> dict | None:
        part = self.part(number)
        return part.report(job) if part else None


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group of `proc`, SIGKILL after 10 s if it is still there."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def summarize_profiles(suite: Suite, job: Job) -> None:
    """Adds the profile summary of each traced configuration to the train_step report."""
    profile = os.path.join(suite.args.out, "profile")
    job.report["profiles"] = {}
    for name in sorted(os.listdir(profile)) if os.path.isdir(profile) else []:
        try:
            job.report["profiles"][name] = profile_summary.summarize(os.path.join(profile, name), top=15,
                                                                     steps=PROFILE_STEPS)
        except (OSError, ValueError) as e:  # a summary is a bonus: keep the measurements
            job.report["profiles"][name] = {"error": str(e)}


def gpu_description() -> str:
    """`nvidia-smi`'s name, memory, driver and clocks, or 'none' (without initialising JAX)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def fmt(value, spec: str = ".1f", scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def step_rows(report: dict | None) -> list[dict]:
    return [] if report is None else report["results"]


def label(r: dict) -> str:
    return (f"{r['method']} R{r['depth']} OS{r['output_stride']} {r['crop']} {r['dtype']}"
            f"{' remat' if r.get('remat') else ''} {r['labeled']}+{r['unlabeled']}")


def render_part1(suite: Suite, part: Part) -> str:
    report = part.report("train_step")
    if report is None:
        return ""
    torch = {(t["method"], t["dtype"]): t for t in report.get("torch_results", [])}
    rows = []
    for r in report["results"]:
        rows.append([label(r), fmt(r["ms_per_step"]), fmt(r.get("ms_per_step_synced")), fmt(r["images_per_s"]),
                     fmt(r["xla_tflops_per_step"], ".2f"), fmt(r["reference_tflops_per_step"], ".2f"),
                     fmt(r["mfu_reference"], ".1f", 100),
                     fmt((torch.get((r["method"], "bfloat16")) or {}).get("ms_per_step")),
                     fmt((torch.get((r["method"], "float32")) or {}).get("ms_per_step")),
                     fmt(r.get("speedup_vs_torch"), ".2f"), fmt(r.get("speedup_vs_torch_float32"), ".2f"),
                     fmt(r["lower_s"] + r["compile_s"]), fmt(r["peak_memory_gib"], ".1f")])
    text = [f"{report['device']} (jax {report['jax']}); bf16 peak {fmt(report['peak_tflops'])} TFLOP/s "
            f"({report['peak_source']}); PyTorch {report.get('torch_device', 'n/a')}", "",
            table(["step", "ms/step", "ms/step synced", "img/s", "TFLOP (XLA)", "TFLOP (model)", "MFU ref %",
                   "torch bf16 ms", "torch TF32 ms", "vs torch bf16", "vs torch TF32", "compile s", "peak GiB"],
                  rows)]
    profiled = part.report("profile") or {}
    for name, summary in sorted(profiled.get("profiles", {}).items()):
        text += ["", f"Profile of {PROFILE_STEPS} steps, {name}:", ""]
        text.append(summary["error"] if "error" in summary else profile_summary.format_summary(summary))
    return "\n".join(text)


def render_part2(suite: Suite, part: Part) -> str:
    warm = part.report("warm")
    cold = suite.report(1, "train_step")
    if warm is None:
        return ""
    cold_rows = {(r["method"], r["dtype"]): r for r in step_rows(cold)}
    rows = []
    for w in warm["results"]:
        c = cold_rows.get((w["method"], w["dtype"]))
        cold_total = None if c is None else c["lower_s"] + c["compile_s"]
        warm_total = w["lower_s"] + w["compile_s"]
        rows.append([label(w), fmt(c and c["lower_s"]), fmt(c and c["compile_s"]), fmt(cold_total),
                     fmt(w["lower_s"]), fmt(w["compile_s"]), fmt(warm_total),
                     fmt(cold_total and cold_total / warm_total, ".1f")])
    return table(["step", "cold lower s", "cold compile s", "cold total s", "warm lower s", "warm compile s",
                  "warm total s", "cold / warm"], rows)


def render_part3(suite: Suite, part: Part) -> str:
    rows = []
    for job in part.jobs:
        for r in step_rows(job.report):
            rows.append([label(r), fmt(r["ms_per_step"]), fmt(r["images_per_s"]), fmt(r["peak_memory_gib"], ".1f"),
                         fmt(r["xla_memory_gib"], ".1f"), fmt(r["mfu_reference"], ".1f", 100),
                         fmt(r["lower_s"] + r["compile_s"])])
    return table(["step", "ms/step", "img/s", "peak GiB", "XLA GiB", "MFU ref %", "compile s"], rows)


def render_part4(suite: Suite, part: Part) -> str:
    text = []
    fp32 = part.report("step_float32")
    bf16 = [r for r in step_rows(suite.report(1, "train_step")) if r["method"] == "csl"]
    rows = [[label(r), fmt(r["ms_per_step"]), fmt(r["images_per_s"]), fmt(r["peak_memory_gib"], ".1f"),
             fmt(r["final_loss"], ".4f")] for r in bf16 + step_rows(fp32)]
    if rows:
        text.append(table(["step", "ms/step", "img/s", "peak GiB", "loss after the timed steps"], rows))
    run = part.report("train_run")
    if run is not None:
        from benchmarks import train_run
        text += ["", train_run.markdown(run)]
    return "\n".join(text)


def render_part5(suite: Suite, part: Part) -> str:
    text = []
    model = part.report("model_forward")
    if model is not None:
        text.append(table(["model", "fwd ms", "fwd+bwd ms", "GFLOP fwd (XLA)", "compile s", "peak GiB"],
                          [[f"R{r['depth']} OS{r['output_stride']} {r['crop']} {r['dtype']} x{r['batch']}",
                            fmt(r["fwd_s"], ".1f", 1e3), fmt(r["fwd_bwd_s"], ".1f", 1e3), fmt(r["fwd_gflops"]),
                            fmt(r["fwd_compile_s"] + r["fwd_bwd_compile_s"]), fmt(r["peak_gib"], ".1f")]
                           for r in model["results"]]))
        for q in model["os8_vs_os16"]:
            text.append(f"\nOS8 / OS16, R{q['depth']} {q['crop']} {q['dtype']}: time x{q['fwd_time_ratio']:.2f} "
                        f"(fwd), x{q['fwd_bwd_time_ratio']:.2f} (fwd+bwd); XLA FLOPs x{q['flop_ratio']:.2f}; "
                        f"model FLOPs x{q['reference_flop_ratio']}")
    dilated = part.report("dilated_conv")
    if dilated is not None:
        from benchmarks import dilated_conv
        text += ["", dilated_conv.markdown(dilated)]
    return "\n".join(text)


def render_part6(suite: Suite, part: Part) -> str:
    report = part.report("eval_scale")
    if report is None:
        return ""
    from benchmarks import eval_scale
    return eval_scale.markdown(report)


def part_markdown(suite: Suite, part: Part) -> str:
    status = "; ".join(f"{j.name}: {j.status} ({j.seconds:.0f} s)" for j in part.jobs)
    try:
        body = part.render(suite, part)
    except (KeyError, TypeError, ValueError) as e:  # a report of another shape: keep the JSON, say so
        body = f"(no table: {type(e).__name__}: {e}; see {part.stem}.json)"
    return f"## {part.number}. {part.title}\n\n{status}\n\n{body}\n"


def targets(suite: Suite) -> list[dict]:
    """Issue 16's targets with the measured value and whether each is met (None: not measured)."""
    rows = {r["method"]: r for r in step_rows(suite.report(1, "train_step"))}
    csl = rows.get("csl", {})
    os8_801 = step_rows(suite.report(3, "os8_801_remat"))
    run = suite.report(4, "train_run")
    waits = [] if run is None else [d["data_wait_share"] for d in run["runs"].values()]

    def check(name, value, ok, unit=""):
        return {"target": name, "measured": value, "unit": unit, "met": None if value is None else ok(value)}

    compiles = [r["lower_s"] + r["compile_s"] for r in rows.values()]
    return [
        check(f"CSL 513 step MFU (model FLOPs) >= {100 * TARGET_MFU:.0f} %", csl.get("mfu_reference"),
              lambda v: v >= TARGET_MFU, "fraction"),
        check(f"CSL 513 vs PyTorch bf16 + channels_last >= {TARGET_VS_TORCH_BF16}x", csl.get("speedup_vs_torch"),
              lambda v: v >= TARGET_VS_TORCH_BF16, "x"),
        check(f"CSL 513 vs PyTorch TF32 (its float32 default) >= {TARGET_VS_TORCH_TF32}x",
              csl.get("speedup_vs_torch_float32"), lambda v: v >= TARGET_VS_TORCH_TF32, "x"),
        check(f"cold compile (lower + compile) < {TARGET_COMPILE_S:.0f} s", max(compiles) if compiles else None,
              lambda v: v < TARGET_COMPILE_S, "s"),
        check(f"data wait < {100 * TARGET_DATA_WAIT:.0f} %", max(waits) if waits else None,
              lambda v: v < TARGET_DATA_WAIT, "fraction"),
        check("CSL OS8 801 + remat fits (peak GiB)", os8_801[0]["peak_memory_gib"] if os8_801 else None,
              lambda v: True, "GiB"),
    ]


def suite_markdown(suite: Suite, index: dict) -> str:
    def shown(t):
        v = t["measured"]
        if v is None:
            return "not measured"
        return f"{100 * v:.1f} %" if t["unit"] == "fraction" else f"{v:.2f} {t['unit']}"

    head = [f"# Benchmark suite ({'tiny, CPU' if suite.args.tiny else 'full'}): {index['elapsed_s']:.0f} s of a "
            f"{suite.args.budget_s:.0f} s budget", "",
            f"host: Python {index['host']['python']}, {index['host']['cpus']} CPUs, GPU: {index['host']['gpu']}", "",
            table(["target", "measured", "met"],
                  [[t["target"], shown(t), {None: "n/a", True: "yes", False: "**no**"}[t["met"]]]
                   for t in index["targets"]]), ""]
    return "\n".join(head + [part_markdown(suite, p) for p in suite.parts])


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", "--budget_s", type=float, default=480.0,
                        help="wall-clock budget of the whole suite in seconds")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], choices=[1, 2, 3, 4, 5, 6],
                        help="the parts to run, in this order (e.g. --parts 4 5 3 to finish an earlier run)")
    parser.add_argument("--min-job-s", type=float, default=None,
                        help="do not start a process with less time left (default 20 s, --tiny 1 s)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: every part with tiny shapes")
    args = parser.parse_args(argv)
    if len(set(args.parts)) != len(args.parts):
        parser.error(f"--parts names a part twice: {args.parts}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.min_job_s is None:
        args.min_job_s = 1.0 if args.tiny else 20.0
    args.out = os.path.abspath(args.out)
    return args


def main(argv=None) -> dict:
    """Runs the suite; returns the index written to suite.json (the Markdown is printed last)."""
    args = parse_args(argv)
    suite = Suite(args)
    index = suite.run()
    with open(os.path.join(args.out, "suite.md")) as f:
        print(f.read())
    return index


if __name__ == "__main__":
    main()
