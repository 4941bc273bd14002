r"""Counts in an XLA HLO text dump (`--xla_dump_to DIR --xla_dump_hlo_as_text`, e.g. train_step.py --hlo-dump).

    python -m benchmarks.hlo_stats DIR_OR_FILE_OR_TGZ [...] [--out hlo_stats.json]

Reads every `*after_optimizations.txt` (not the buffer-assignment, memory or live-range reports)
under the paths given: HLO text files, dump directories, or .tgz archives of them (what
`benchmarks/gpu_suite.sh runA` brings back). Per module:

- `cudnn_convs`: cuDNN convolution custom calls by target (`__cudnn$convForward`,
  `__cudnn$convBackwardInput`, `__cudnn$convBackwardFilter`, ...);
- `strided_conv_forward`: `__cudnn$convForward` calls whose window has a stride > 1, with
  `strided_conv_forward_by_window` ('size=33x33 stride=6x6' -> count) and
  `strided_conv_forward_large_window` (a window side > 3). A weight gradient of a stride-1 conv with
  dilation d is a convolution with window stride d, which XLA's conv rewriter cannot match as a
  backward-filter conv, so it runs as a forward cuDNN conv with a map-sized "filter": these are the
  dilated wgrads (a real strided conv of the model has a 1x1 or 3x3 window);
- `command_buffer_computations` (computations named command_buffer*: CUDA graphs) and
  `command_buffer_calls` (the instructions that run them);
- `fusions`, `convert_fusions` (fusions named after a convert, as XLA names `loop_convert_fusion`),
  `f32_convert_fusions` (of those, with a float32 result) and `f32_convert_fusions_4d` (a float32
  result of rank >= 4: activation-sized upcasts), and `fusions_with_f32_upcast_4d` (fusions whose
  fused computation converts to a float32 array of rank >= 4, whatever their name);
- `instructions`, and `custom_call_targets` (every custom-call target, counted).

`main` names the module with the most instructions (the train step in a train_step.py dump).
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import tarfile

SUFFIX = "after_optimizations.txt"
_WINDOW = re.compile(r"window=\{([^}]*)\}")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")


def _split_instruction(line: str):
    """(name, result shape text, opcode, rest) of an HLO instruction line, or None for other lines."""
    m = re.match(r"\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # tuple shape: up to the matching parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    return (m.group(1), shape, op.group(1), rest) if op else None


def _arrays(shape: str) -> list[tuple[str, int]]:
    """(element type, rank) of every array in a shape text: 'f32[16,33,33,256]{3,2,1,0}' -> [('f32', 4)]."""
    return [(dtype, len([d for d in dims.split(",") if d])) for dtype, dims in _ARRAY.findall(shape)]


def _window_strides(window: str) -> tuple[list[int], list[int]]:
    """(size, stride) per spatial dimension of a window text 'size=3x3 stride=2x2 pad=...'."""
    fields = dict(f.split("=", 1) for f in window.split() if "=" in f)
    size = [int(x) for x in fields.get("size", "").split("x") if x]
    stride = [int(x) for x in fields.get("stride", "").split("x") if x] or [1] * len(size)
    return size, stride


def module_stats(text: str) -> dict:
    """The counts of one HLO module's text (see the module docstring)."""
    computations, upcast_computations = [], set()
    current = None
    instructions = fusions = convert_fusions = f32_convert = f32_convert_4d = strided = large = 0
    targets, by_window, fusion_calls, cb_calls = collections.Counter(), collections.Counter(), [], 0
    for line in text.splitlines():
        if line and not line[0].isspace():  # a computation header, the module line, or '}'
            header = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)[\s(].*\{\s*$", line)
            if header and not line.startswith("HloModule"):
                current = header.group(1)
                computations.append(current)
            continue
        parts = _split_instruction(line)
        if parts is None:
            continue
        name, shape, op, rest = parts
        instructions += 1
        if op == "convert" and any(dtype == "f32" and rank >= 4 for dtype, rank in _arrays(shape)):
            upcast_computations.add(current)
        called = _CALLS.findall(rest)
        if any(c.startswith("command_buffer") for c in called):
            cb_calls += 1
        if op == "fusion":
            fusions += 1
            fusion_calls.append(called)
            if "convert" in name:
                convert_fusions += 1
                arrays = _arrays(shape)
                f32_convert += any(dtype == "f32" for dtype, _ in arrays)
                f32_convert_4d += any(dtype == "f32" and rank >= 4 for dtype, rank in arrays)
        elif op == "custom-call":
            target = _TARGET.search(rest)
            target = target.group(1) if target else "?"
            targets[target] += 1
            window = _WINDOW.search(rest)
            if target == "__cudnn$convForward" and window:
                size, stride = _window_strides(window.group(1))
                if any(s > 1 for s in stride):
                    strided += 1
                    large += any(s > 3 for s in size)
                    by_window[f"size={'x'.join(map(str, size))} stride={'x'.join(map(str, stride))}"] += 1
    return {
        "instructions": instructions, "computations": len(computations),
        "cudnn_convs": {t: n for t, n in sorted(targets.items()) if t.startswith("__cudnn$conv")},
        "strided_conv_forward": strided, "strided_conv_forward_large_window": large,
        "strided_conv_forward_by_window": dict(by_window.most_common()),
        "command_buffer_computations": sum(c.startswith("command_buffer") for c in computations),
        "command_buffer_calls": cb_calls,
        "fusions": fusions, "convert_fusions": convert_fusions, "f32_convert_fusions": f32_convert,
        "f32_convert_fusions_4d": f32_convert_4d,
        "fusions_with_f32_upcast_4d": sum(any(c in upcast_computations for c in calls) for calls in fusion_calls),
        "custom_call_targets": dict(targets.most_common()),
    }


def read_texts(paths: list[str]) -> dict[str, str]:
    """{name: HLO text} of every after-optimisation module under `paths` (files, directories, .tgz)."""
    texts = {}
    for path in paths:
        if os.path.isdir(path):
            for file in sorted(glob.glob(os.path.join(path, "**", f"*{SUFFIX}"), recursive=True)):
                with open(file) as f:
                    texts[os.path.relpath(file, path)] = f.read()
        elif path.endswith((".tgz", ".tar.gz", ".tar")):
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    if member.isfile() and member.name.endswith(SUFFIX):
                        texts[member.name] = tar.extractfile(member).read().decode()
        else:
            with open(path) as f:
                texts[os.path.basename(path)] = f.read()
    return texts


def summarize(paths: list[str]) -> dict:
    """{'modules': {name: module_stats}, 'main': the module with the most instructions}."""
    texts = read_texts(paths)
    if not texts:
        raise FileNotFoundError(f"no *{SUFFIX} under {paths}: was the dump written with --xla_dump_hlo_as_text?")
    modules = {name: module_stats(text) for name, text in texts.items()}
    return {"main": max(modules, key=lambda n: modules[n]["instructions"]), "modules": modules}


def format_summary(summary: dict) -> str:
    """The main module's counts as Markdown."""
    name = summary["main"]
    s = summary["modules"][name]
    rows = [("instructions", s["instructions"]), ("fusions", s["fusions"]),
            ("cuDNN conv custom calls", ", ".join(f"{t.split('$')[-1]} {n}" for t, n in s["cudnn_convs"].items())
             or "0"),
            ("convForward with window stride > 1", s["strided_conv_forward"]),
            ("  of which a window side > 3 (dilated wgrads)", s["strided_conv_forward_large_window"]),
            ("  by window", "; ".join(f"{w}: {n}" for w, n in s["strided_conv_forward_by_window"].items()) or "-"),
            ("command-buffer computations", s["command_buffer_computations"]),
            ("command-buffer calls", s["command_buffer_calls"]),
            ("convert fusions (f32 result / f32 rank >= 4)",
             f"{s['convert_fusions']} ({s['f32_convert_fusions']} / {s['f32_convert_fusions_4d']})"),
            ("fusions with an f32 rank >= 4 upcast inside", s["fusions_with_f32_upcast_4d"])]
    return "\n".join([f"HLO module {name} ({len(summary['modules'])} modules read)", "", "| count | value |",
                      "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="HLO text files, dump directories or .tgz archives")
    parser.add_argument("--out", default="", help="also write the counts as JSON here")
    args = parser.parse_args(argv)
    summary = summarize(args.paths)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
