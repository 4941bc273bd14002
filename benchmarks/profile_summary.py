r"""Summary of a jax.profiler trace: where the device time of the traced steps goes.

    python -m benchmarks.profile_summary TRACE_DIR [--top 25] [--out summary.json]

Reads the `*.xplane.pb` that `jax.profiler.trace(TRACE_DIR)` wrote (the newest one under
TRACE_DIR) with `jax.profiler.ProfileData` and reports, over every XLA op event (an event carrying
an `hlo_op` stat, or any event on a device plane's stream line: on a GPU the kernels on the
`/device:GPU:N` planes, on the CPU backend the thunks on `/host:CPU`):

- `busy_ms`: the union of the op intervals (time the device ran anything), `span_ms`: first op
  start to last op end, and `idle_share` = 1 - busy / span (launch gaps, host waits);
- `by_category`: op time per category (convolution, matmul, copy/transpose, reduction, fusion,
  other; see `category`); the top ops (`top_ops`, by HLO op: on a GPU a `command_buffer_N` op is a
  CUDA graph of many kernels) and the top kernel families (`top_kernels`, kernel names without
  their instance numbers) by total time, with their counts;
- `host_dispatch_ms`: the time the Python thread spent in jitted-function calls (`PjitFunction`).

The categories come from the op and kernel names, so they are a guide: cuDNN/cuBLAS kernels are
recognised by name ('conv', 'xmma', 'cudnn', 'gemm', 'cublas').
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re

CATEGORIES = (  # first match wins; tested against the op name and the kernel name, lower case
    ("convolution", ("convolution", "conv.", "conv-", "cudnn", "xmma", "implicit_gemm", "fprop", "dgrad", "wgrad")),
    ("matmul", ("gemm", "cublas", "dot", "matmul")),
    ("copy/transpose", ("copy", "transpose", "memcpy", "memset", "bitcast")),
    ("reduction", ("reduce", "reduction")),
    ("fusion", ("fusion",)),
)


def category(op_name: str, kernel_name: str = "") -> str:
    """The category of an op from its HLO op name and its kernel name (see CATEGORIES)."""
    text = f"{op_name} {kernel_name}".lower()
    return next((name for name, keys in CATEGORIES if any(k in text for k in keys)), "other")


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the half-open intervals [start, end) (overlaps counted once)."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def find_xplane(trace_dir: str) -> str:
    """The newest `*.xplane.pb` under `trace_dir`; raises naming the directory when there is none."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: was it written by jax.profiler.trace?")
    return max(paths, key=os.path.getmtime)


def op_events(path: str) -> list[tuple[str, str, str, float, float]]:
    """(plane name, op name, kernel name, start ns, duration ns) of the XLA op events of the trace.

    On an accelerator only the kernels of the device planes' stream lines count (a plane may also
    carry derived lines, e.g. 'XLA Ops', that repeat them); elsewhere every event with an `hlo_op`.
    """
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    host, device = [], []
    for plane in data.planes:
        on_device = plane.name.startswith("/device")
        for line in plane.lines:
            if on_device and not line.name.startswith("Stream"):
                continue
            for event in line.events:
                stats = dict(event.stats)
                if event.duration_ns > 0 and ("hlo_op" in stats or on_device):
                    op = str(stats.get("hlo_op", event.name))
                    (device if on_device else host).append(
                        (plane.name, op, event.name, event.start_ns, event.duration_ns))
    return device or host


def host_dispatch_ns(path: str) -> float:
    """Time in the outermost `PjitFunction(...)` events of the Python thread (a line named after the
    interpreter, 'python' or 'python3'): the host side of jitted calls, launches included."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    intervals = [(e.start_ns, e.start_ns + e.duration_ns) for plane in data.planes if plane.name.startswith("/host")
                 for line in plane.lines if line.name.startswith("python")
                 for e in line.events if e.name.startswith("PjitFunction")]
    return union_length(intervals)  # nested PjitFunction events count once


def kernel_family(kernel: str) -> str:
    """A kernel name without its instance number: 'input_reduce_fusion_567' -> 'input_reduce_fusion'."""
    return re.sub(r"[_.]?\d+$", "", kernel)


def summarize(trace_dir: str, top: int = 25, steps: int = 0) -> dict:
    """The summary dict of the trace under `trace_dir` (see the module docstring).

    `steps`: how many train steps the trace holds; adds the per-step busy and host figures.
    """
    path = find_xplane(trace_dir)
    events = op_events(path)
    if not events:
        raise ValueError(f"{path} holds no XLA op events (nothing ran while tracing?)")
    intervals = [(start, start + duration) for *_, start, duration in events]
    busy = union_length(intervals)
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    total = sum(duration for *_, duration in events)
    by_category = collections.Counter()
    by_op: dict[str, list] = {}
    by_kernel: dict[str, list] = {}
    for _, op, kernel, _, duration in events:
        by_category[category(op, kernel)] += duration
        for table, key, example in ((by_op, op, kernel), (by_kernel, kernel_family(kernel), op)):
            entry = table.setdefault(key, [0.0, 0, example])
            entry[0] += duration
            entry[1] += 1
    ops = sorted(by_op.items(), key=lambda item: -item[1][0])[:top]
    kernels = sorted(by_kernel.items(), key=lambda item: -item[1][0])[:top]
    host = host_dispatch_ns(path)
    per_step = {} if steps <= 0 else {"steps": steps, "busy_ms_per_step": busy / 1e6 / steps,
                                      "host_dispatch_ms_per_step": host / 1e6 / steps}
    return {**per_step,
        "xplane": path, "planes": sorted({p for p, *_ in events}),
        "op_events": len(events), "op_total_ms": total / 1e6, "busy_ms": busy / 1e6, "span_ms": span / 1e6,
        "idle_share": 1.0 - busy / span if span > 0 else 0.0,
        "host_dispatch_ms": host / 1e6,
        "by_category": {name: {"ms": ns / 1e6, "share": ns / total} for name, ns in by_category.most_common()},
        "top_ops": [{"op": op, "kernel": kernel, "count": count, "ms": ns / 1e6, "share": ns / total}
                    for op, (ns, count, kernel) in ops],
        "top_kernels": [{"kernel": family, "category": category(op, family), "count": count, "ms": ns / 1e6,
                         "share": ns / total} for family, (ns, count, op) in kernels],
    }


def format_summary(summary: dict) -> str:
    """The summary as Markdown: the totals, the categories, the top ops."""
    lines = [f"device busy {summary['busy_ms']:.1f} ms of a {summary['span_ms']:.1f} ms span "
             f"(idle {100 * summary['idle_share']:.1f} %); op time {summary['op_total_ms']:.1f} ms in "
             f"{summary['op_events']} events; host dispatch {summary['host_dispatch_ms']:.1f} ms"]
    if "steps" in summary:
        lines.append(f"per step ({summary['steps']} traced): device busy {summary['busy_ms_per_step']:.1f} ms, "
                     f"host dispatch {summary['host_dispatch_ms_per_step']:.1f} ms")
    lines += ["", "| category | ms | share |", "|---|---|---|"]
    lines += [f"| {name} | {c['ms']:.2f} | {100 * c['share']:.1f} % |" for name, c in summary["by_category"].items()]
    lines += ["", "| kernel (instance numbers dropped) | category | count | ms | share |", "|---|---|---|---|---|"]
    lines += [f"| {k['kernel'][:70]} | {k['category']} | {k['count']} | {k['ms']:.2f} | {100 * k['share']:.1f} % |"
              for k in summary["top_kernels"]]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace_dir")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--steps", type=int, default=0, help="train steps in the trace (per-step figures)")
    parser.add_argument("--out", default="", help="also write the summary JSON here")
    args = parser.parse_args(argv)
    summary = summarize(args.trace_dir, args.top, args.steps)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
