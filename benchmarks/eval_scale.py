"""Exact whole-image evaluation of a set of many image sizes (COCO-like): compiles, images/s, dummy slots.

    python -m benchmarks.eval_scale --quick                 # CPU smoke run (< 1 min on 2 cores)
    python -m benchmarks.eval_scale --long-side 320         # CPU, tiny model
    python -m benchmarks.eval_scale --model full --images 64 --distinct 1 \
        --groupings consecutive buckets --out eval_scale.json      # GPU (benchmarks/suite.py part 6)
    python -m benchmarks.eval_scale --plan-only --images 5000 --batch 8   # the batches alone, no model

The stream: --images synthetic images (random pixels, 81 classes, 10 % ignored pixels) whose sizes
are modelled on COCO val (not read from it): the long side is 640 (--long-side scales every size
by L / 640), the short side is drawn from SHORT_SIDES, 49 values weighted towards 480 and 427 (COCO's
most frequent sizes are 640 x 480 and 640 x 427), 3/4 of the images landscape, 1/4 portrait, in
random order. --distinct K keeps the K most frequent short sides (after scaling), i.e. at most 2K
shapes, so that a large model compiles few programs. The model: a tiny DeepLabV3+ (ResNet,
`common.TINY_MODEL`) or, with --model full, UniMatch V1's COCO model (Xception-65 DeepLabV3+, OS16),
random weights, float32.

Each grouping evaluates the stream twice with its own `Evaluator` ('whole', --batch images per
step): `consecutive` (only consecutive same-shape images share a batch, the grouping before shape
buckets), `buckets` (the Evaluator's shape buckets) and `pad32` (buckets, images padded to a multiple
of 32: inexact, for in-training evaluation). Per grouping: programs compiled (one per distinct padded
shape), compile seconds (jax.monitoring: trace + lowering + XLA compile, first pass), the first pass,
images/s of the second pass (every program cached), batches and the fraction of batch slots that
were dummies, and whether the confusion matrix equals consecutive's (exact groupings must).
--plan-only runs no model: the programs, batches and dummy slots each grouping forms for the stream
(at COCO val's 5,000 images in seconds); the other fields are null.

Prints the JSON report (also written to --out), then a table.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from benchmarks.model_forward import random_variables
from configs import common
from csl_jax.evaluation.evaluator import Evaluator
from csl_jax.models import DeepLabV3Plus

NUM_CLASSES = 81
#: short side (px, for a 640 long side) -> relative frequency: COCO-like, not COCO's counts
SHORT_SIDES = {480: 35, 427: 18, 426: 4, 428: 4, 425: 3, 424: 3, 360: 3, 429: 2, 423: 2, 512: 2, 640: 2,
               **{s: 0.5 for s in (213, 240, 256, 300, 320, 339, 383, 400, 419, 421, 422, 430, 431, 432, 434,
                                   435, 436, 438, 443, 448, 453, 457, 459, 463, 468, 471, 473, 478, 481, 483,
                                   485, 500, 533, 538, 549, 566, 576, 596)}}
GROUPINGS = {"consecutive": dict(shape_buckets=False), "buckets": {}, "pad32": dict(pad_to_multiple=32)}
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_compile_seconds: list[float] = []


def _record_compile(event: str, duration: float, **kwargs) -> None:
    if event in COMPILE_EVENTS:
        _compile_seconds.append(duration)


jax.monitoring.register_event_duration_secs_listener(_record_compile)


def image_sizes(count: int, long_side: int, distinct: int | None, seed: int = 0) -> list[tuple[int, int]]:
    """`count` (H, W) drawn from SHORT_SIDES scaled to `long_side`, 3/4 landscape, in random order."""
    weights: dict[int, float] = {}
    for short, w in SHORT_SIDES.items():
        scaled = max(1, round(short * long_side / 640))
        weights[scaled] = weights.get(scaled, 0.0) + w
    kept = sorted(weights, key=lambda s: -weights[s])[:distinct]
    p = np.array([weights[s] for s in kept])
    rng = np.random.default_rng(seed)
    shorts = rng.choice(kept, size=count, p=p / p.sum())
    landscape = rng.random(count) < 0.75
    return [(int(s), long_side) if land else (long_side, int(s)) for s, land in zip(shorts, landscape)]


def make_dataset(sizes: list[tuple[int, int]], seed: int = 0) -> list[dict]:
    """{'id', 'image' (H, W, 3) uint8, 'label' (H, W) uint8 in [0, 81) or 255} per size."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (h, w) in enumerate(sizes):
        label = rng.integers(0, NUM_CLASSES, (h, w), dtype=np.uint8)
        label[rng.random((h, w)) < 0.1] = 255
        out.append({"id": f"img{i}", "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "label": label})
    return out


def make_model(kind: str):
    """(apply_fn, variables) of the tiny or the full (Xception-65, OS16) DeepLabV3+, random float32 weights."""
    if kind == "tiny":
        model = DeepLabV3Plus(NUM_CLASSES, **common.TINY_MODEL)
    else:
        model = DeepLabV3Plus(NUM_CLASSES, backbone_arch="xception65", output_stride=16)
    variables = random_variables(model, (1, 65, 65, 3))

    def apply_fn(v, x):
        return model.apply(v, x, train=False)[0]

    return apply_fn, variables


def measure(name: str, apply_fn, variables, dataset: list[dict], batch: int) -> dict:
    """Two passes of one grouping over `dataset`; returns its row of the report (and the confusion)."""
    evaluator = Evaluator(apply_fn, num_classes=NUM_CLASSES, protocol="whole", batch_size=batch, **GROUPINGS[name])
    _compile_seconds.clear()
    start = time.perf_counter()
    evaluator.evaluate(variables, dataset)
    first = time.perf_counter() - start
    compile_s = sum(_compile_seconds)
    start = time.perf_counter()
    results = evaluator.evaluate(variables, dataset)
    second = time.perf_counter() - start
    b = results["batching"]
    return {"grouping": name, "programs": evaluator.num_programs, "compile_s": compile_s, "first_pass_s": first,
            "second_pass_s": second, "images_per_s": len(dataset) / second, "batches": b["batches"],
            "dummy_fraction": b["dummy_fraction"], "recompiled_in_second_pass": b["compiled"],
            "miou": results["miou"], "confusion": results["confusion"]}


def plan(name: str, sizes: list[tuple[int, int]], batch: int) -> dict:
    """The programs and batches one grouping forms for images of `sizes` (no model, no device work)."""
    evaluator = Evaluator(lambda v, x: x, num_classes=NUM_CLASSES, protocol="whole", batch_size=batch,
                          **GROUPINGS[name])
    examples = [(i, np.broadcast_to(np.uint8(0), s + (3,)), np.broadcast_to(np.uint8(0), s))
                for i, s in enumerate(sizes)]  # full-size nbytes, no memory
    batches = list(evaluator._groups(examples))
    return {"grouping": name, "programs": len({evaluator._padded_shape(b[0][2].shape) for b in batches}),
            "compile_s": None, "first_pass_s": None, "second_pass_s": None, "images_per_s": None,
            "batches": len(batches), "dummy_fraction": 1.0 - len(sizes) / (len(batches) * batch),
            "recompiled_in_second_pass": None, "miou": None, "same_confusion_as_consecutive": None}


def main(argv=None) -> dict:
    """Runs every grouping; prints the JSON report, then the table; returns the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--long-side", type=int, default=640, help="every size scaled by this / 640")
    parser.add_argument("--distinct", type=int, default=None, help="keep the K most frequent short sides")
    parser.add_argument("--batch", type=int, default=8, help="images per step (a multiple of the devices)")
    parser.add_argument("--groupings", nargs="+", choices=list(GROUPINGS), default=list(GROUPINGS))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 48 images, long side 128, 4 short sides (8 shapes), tiny model")
    parser.add_argument("--plan-only", action="store_true", help="no model: the batches each grouping forms")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.images, args.long_side, args.distinct = "tiny", 48, 128, 4

    sizes = image_sizes(args.images, args.long_side, args.distinct)
    if args.plan_only:
        rows = [plan(name, sizes, args.batch) for name in args.groupings]
    else:
        dataset = make_dataset(sizes)
        apply_fn, variables = make_model(args.model)
        rows = [measure(name, apply_fn, variables, dataset, args.batch) for name in args.groupings]
        reference = next((r["confusion"] for r in rows if r["grouping"] == "consecutive"), None)
        for r in rows:
            confusion = r.pop("confusion")
            r["same_confusion_as_consecutive"] = (None if reference is None
                                                  else bool(np.array_equal(confusion, reference)))
    device = jax.devices()[0]
    report = {"device": f"{device.platform}: {device.device_kind}", "devices": jax.device_count(),
              "jax": jax.__version__, "model": args.model, "batch": args.batch, "images": len(sizes),
              "long_side": args.long_side, "distinct_shapes": len(set(sizes)), "num_classes": NUM_CLASSES,
              "quick": args.quick, "plan_only": args.plan_only, "results": rows}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print("\n" + markdown(report))
    return report


def markdown(report: dict) -> str:
    """The report's caption and table (Markdown)."""
    model = "no model (--plan-only)" if report["plan_only"] else f"{report['model']} DeepLabV3+"
    lines = [f"{report['device']} x{report['devices']}, {model}, {report['images']} images of "
             f"{report['distinct_shapes']} shapes (long side {report['long_side']}), batch {report['batch']}", "",
             "| grouping | programs | compile s | 1st pass s | img/s (2nd pass) | batches | dummy slots % | "
             "same confusion |", "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        same = {None: "n/a", True: "yes", False: "no"}[r["same_confusion_as_consecutive"]]
        times = ["n/a" if r[k] is None else f"{r[k]:.1f}" for k in ("compile_s", "first_pass_s", "images_per_s")]
        lines.append(f"| {r['grouping']} | {r['programs']} | {' | '.join(times)} | {r['batches']} | "
                     f"{100 * r['dummy_fraction']:.0f} | {same} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
