r"""Speed of the real train steps (supervised, UniMatch, CSL): step time, compile time, memory, MFU.

    python -m benchmarks.train_step --method csl unimatch --depth 101 --output-stride 16 \
        --crop 513 --dtype bfloat16 --out train_step.json [--torch] [--peak-tflops 798]
    python -m benchmarks.train_step --tiny    # CPU smoke test (tiny model, crop 33, 2 + 2)

`--compilation-cache DIR` turns on the persistent XLA cache (a first process measures the cold
compile and fills it, a second with `--compile-only` measures the warm one); `--profile-dir DIR`
traces a few extra steps of each configuration with jax.profiler (see benchmarks/profile_summary.py).

Each configuration builds the method from the Pascal config of that method (configs/*_pascal.py,
so the method options are the real ones), overrides model and batch, and times
`csl_jax.train.make_train_step` on synthetic batches of the right shapes (no data pipeline, so
the step time is pure device time). After --warmup steps, --iters steps are timed twice: each
ended by block_until_ready (`ms_per_step_synced`, their median, and `ms_per_step_min`: these
include the host's launch latency before the device starts), then queued back to back and waited
for once, as the training loop runs them (`ms_per_step`, the throughput figure every other field
uses). Reported per configuration:

- ms/step and images/s (labeled + unlabeled images of one step);
- lower and compile seconds, timed separately;
- peak device memory (`memory_stats()['peak_bytes_in_use']`, monotonic over the process; 'n/a'
  where the backend has none, e.g. CPU) and XLA's own estimate of the step's memory
  (`memory_analysis()`: arguments + outputs + temporaries - aliased);
- TFLOP per step from XLA's cost analysis (summed over devices) next to the cost model of
  /work/shared/docs/performance.md (table 1 forward FLOPs x the pass count of table 2), and their
  ratio; 'n/a' where the table has no entry (other crops, the tiny model);
- MFU = XLA FLOPs / step time / peak, with the peak from --peak-tflops or measured with a large
  bf16 matmul on the device; and mfu_reference, the same with the cost model's FLOPs. XLA counts
  only the kernel taps that land inside the input, the cost model (PyTorch's FlopCounterMode)
  counts every tap, so XLA's figure is lower where dilated taps read padding (ASPP at OS8).

With --torch, benchmarks/torch_reference.py runs the same configurations first, in a subprocess
(before JAX claims the accelerator's memory), and the table shows JAX's speed-up over it. Prints
one line per configuration while running, writes the JSON report, and prints the table last.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.model_forward import random_like
from configs import (ccvc_pascal, common, cpcl_pascal, csl_pascal, css_pascal, supervised_pascal, u2pl_pascal,
                     unimatch_pascal)
from csl_jax import optim, parallel, train
from csl_jax.methods import build_method

METHOD_CONFIGS = {"supervised": supervised_pascal, "unimatch": unimatch_pascal, "csl": csl_pascal,
                  "ccvc": ccvc_pascal, "u2pl": u2pl_pascal, "css": css_pascal, "cpcl": cpcl_pascal}
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}

# performance.md table 1: GFLOP of one forward pass per image, 21 classes, keyed (depth, OS) -> crop.
FORWARD_GFLOPS = {
    (101, 16): {321: 80, 513: 200, 769: 443, 801: 481},
    (101, 8): {321: 219, 513: 550, 769: 1226, 801: 1329},
    (50, 16): {321: 63, 513: 159, 769: 352, 801: 382},
    (50, 8): {321: 155, 513: 390, 769: 870, 801: 943},
}
# Share of the ASPP + decoder in the R101 forward FLOPs (performance.md §1); the head is the same
# for R50, so its share there is scaled by the R101/R50 FLOP ratio.
HEAD_SHARE_R101 = {16: 0.38, 8: 0.31}
PEAK_MATMUL = {"accelerator": (8192, jnp.bfloat16), "cpu": (512, jnp.float32)}


# ---------------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------------
def forward_passes(method_opts, labeled: int, unlabeled: int, head_share: float) -> float:
    """Image forward passes F per step (performance.md §2; a backward pass counts 2F).

    Supervised: 3 B_l. Semi-supervised: no-grad pseudo-label passes (EMA teacher on [u_w; u'_w]:
    2 B_u, else the mix batch: B_u) + main pass 3 (B_l + B_u) (x (1 + head share) with FP, whose
    head runs twice) + strong pass 3 B_u per strong view. CCVC: two networks, each with a labeled
    train pass 3 B_l, a no-grad eval pass B_u and the mixed and raw train passes 3 B_u each (its
    304x304 mapping is left out). U2PL (after its supervised-only epochs): the eval-mode teacher
    on u B_u, the student's train pass 3 (B_l + B_u) and the teacher's no-grad train pass
    B_l + B_u (its decoder, with the representation head, counted as UniMatch's). CSS: the EMA
    teacher's no-grad train passes on x and u B_l + B_u and the student's train passes on x and u~
    3 (B_l + B_u) (its classifier and representation heads counted as UniMatch's decoder). CPCL: two
    networks, each with train passes on x and x_mix 3 (B_l + B_u) and no-grad train passes on u0
    and u1 2 B_u (its CPS head counted as UniMatch's decoder).
    """
    if method_opts.name == "supervised":
        return 3.0 * labeled
    if method_opts.name == "u2pl":
        return unlabeled + 4.0 * (labeled + unlabeled)
    if method_opts.name == "css":
        return 4.0 * (labeled + unlabeled)
    if method_opts.name == "ccvc":
        return 2 * (3.0 * labeled + unlabeled + 6.0 * unlabeled)
    if method_opts.name == "cpcl":
        return 2 * (3.0 * labeled + 5.0 * unlabeled)
    no_grad = 2 * unlabeled if method_opts.teacher == "ema" else unlabeled
    main = 3.0 * (labeled + unlabeled) * ((1.0 + head_share) if method_opts.use_fp else 1.0)
    strong = 3.0 * unlabeled * (1 if method_opts.second_view == "none" else 2)
    return no_grad + main + strong


def reference_tflops(config) -> float | None:
    """TFLOP per step of `config` from the performance.md tables, None where they have no entry."""
    model = config.model
    if model.blocks is not None or model.width != 64 or model.head_width != 256:
        return None
    key = (model.depth, model.output_stride)
    crop = config.data.crop_size
    if key not in FORWARD_GFLOPS or crop not in FORWARD_GFLOPS[key]:
        return None
    gflops = FORWARD_GFLOPS[key][crop]
    head_share = HEAD_SHARE_R101[model.output_stride] * FORWARD_GFLOPS[(101, model.output_stride)][crop] / gflops
    passes = forward_passes(config.method, config.batch.labeled, config.batch.unlabeled, head_share)
    return passes * gflops / 1e3


# ---------------------------------------------------------------------------------------------
# Configurations and synthetic batches
# ---------------------------------------------------------------------------------------------
def make_config(method: str, depth: int, output_stride: int, crop: int, dtype: str, labeled: int,
                unlabeled: int, tiny: bool = False, remat: bool = False):
    """The method's Pascal config with the benchmark's model (`common.TINY_MODEL` if `tiny`), crop, batch."""
    c = METHOD_CONFIGS[method].get_config()
    c.model.init_from = "none"  # timing only: random weights, nothing to download
    c.model.depth = depth
    c.model.output_stride = output_stride
    c.model.aspp_rates = ASPP_RATES[output_stride]
    c.model.dtype = dtype
    c.model.remat = remat
    if tiny:
        common.tiny_model(c)
    c.data.crop_size = crop
    c.batch.labeled = labeled
    c.batch.unlabeled = unlabeled
    c.loss.group_size = min(c.loss.group_size, labeled, unlabeled)  # the reference's 2, or the whole batch
    if method == "ccvc":  # CutMix partner groups of the loss group
        c.method.mix_group = c.loss.group_size
    if method == "u2pl" and tiny:  # CPU smoke test: small memory bank and representation
        c.model.rep_dim = 16
        c.method.update(queue_capacity=1000, queue_capacity_class0=1500)
    if method == "css" and tiny:  # CPU smoke test: small representation and contrastive sample
        c.model.rep_dim = 16
        c.method.update(num_queries=16, num_negatives=32)
    return c


def unlabeled_views(method) -> tuple[str, ...] | None:
    """The views of a method's 'unlabeled' stream, or None when it has none (supervised)."""
    spec = method.streams().get("unlabeled")
    return None if spec is None else spec.views


def synthetic_batch(views: tuple[str, ...] | None, labeled: int, unlabeled: int, crop: int, num_classes: int,
                    seed: int = 0, labeled_views: tuple[str, ...] = ()) -> dict:
    """Random host batch with the pipeline's keys, shapes and dtypes (csl_jax/data/pipeline.py).

    labeled: image (B_l, crop, crop, 3) float32, label (B_l, crop, crop) int32 (255 on a border).
    Unless `views` is None (supervised), 'unlabeled' and 'mix' with B_u images each: weak and
    `views` (`unlabeled_views(method)`; float32 images), ignore int32 (255 on a border), label
    int32 (all 255), cutmix_box / cutmix_box2 / block_mask (B_u, crop, crop) bool; CSS's
    'css_strong' adds css_strong float32, warp_index int32 (-1 on a border), css_flip (B_u,) bool and
    css_box bool, and its labeled view 'css_photometric' (in `labeled_views`) css_image float32.
    """
    rng = np.random.default_rng(seed)
    border = max(1, crop // 16)

    def images(n):
        return rng.standard_normal((n, crop, crop, 3), dtype=np.float32)

    def boxes(n):
        y, x = np.mgrid[:crop, :crop]
        corners = rng.integers(0, crop // 2, size=(n, 2))
        return np.stack([(y >= a) & (y < a + crop // 2) & (x >= b) & (x < b + crop // 2) for a, b in corners])

    label = rng.integers(0, num_classes, size=(labeled, crop, crop)).astype(np.int32)
    label[:, -border:] = 255
    batch = {"labeled": {"image": images(labeled), "label": label}}
    if "css_photometric" in labeled_views:
        batch["labeled"]["css_image"] = images(labeled)
    if views is None:
        return batch
    for stream in ("unlabeled", "mix"):
        ignore = np.zeros((unlabeled, crop, crop), np.int32)
        ignore[:, -border:] = 255
        arrays = {"weak": images(unlabeled), "ignore": ignore,
                  "label": np.full((unlabeled, crop, crop), 255, np.int32)}
        for view in views:
            if view in ("u2pl_box", "cpcl_mask"):  # U2PL's in-batch CutMix box, CPCL's 3-box mask: a mask only
                arrays[view] = boxes(unlabeled)
                continue
            if view == "css_strong":  # CSS: warped strong image, its source index, flip bit, CutMix box
                index = rng.integers(0, crop * crop, size=(unlabeled, crop, crop)).astype(np.int32)
                index[:, -border:] = -1
                arrays.update(css_strong=images(unlabeled), warp_index=index, css_box=boxes(unlabeled),
                              css_flip=rng.random(unlabeled) < 0.5)
                continue
            arrays[view] = images(unlabeled)
            mask_key = {"strong": "cutmix_box", "strong2": "cutmix_box2", "tmp": "block_mask"}[view]
            arrays[mask_key] = boxes(unlabeled) if view != "tmp" else rng.random((unlabeled, crop, crop)) < 0.5
        batch[stream] = arrays
    return batch


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
def measure_peak_tflops(size: int, dtype, iters: int = 5, chain: int = 20, warmup_s: float = 1.0) -> float:
    """TFLOP/s of a jitted (size, size) x (size, size) matmul in `dtype`.

    The operands are random normal (constant data such as ones or zeros runs measurably faster on
    GPUs). The matmul first runs for `warmup_s` seconds (an idle GPU starts at a low clock), then
    each of `iters` timings covers `chain` matmuls queued back to back (no launch gaps); the median.
    """
    a, b = (jax.random.normal(key, (size, size), dtype) for key in jax.random.split(jax.random.PRNGKey(0)))
    matmul = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        jax.block_until_ready(matmul(a, b))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready([matmul(a, b) for _ in range(chain)])
        times.append((time.perf_counter() - start) / chain)
    return 2.0 * size ** 3 / statistics.median(times) / 1e12


def xla_flops(compiled) -> float | None:
    """FLOPs of one call of the compiled (per-device) program from XLA's cost analysis, or None."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def xla_memory_gib(compiled) -> float | None:
    """XLA's estimate of the step's device memory (args + outputs + temporaries - aliased), GiB."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return None
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return total / 2 ** 30


def peak_memory_gib(device) -> float | None:
    """`peak_bytes_in_use` of `device` in GiB (monotonic over the process), None when unavailable."""
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2 ** 30


def bench_one(config, devices, num_classes: int, warmup: int, iters: int, peak_tflops: float,
              compile_only: bool = False, profile_dir: str | None = None, profile_steps: int = 3) -> dict:
    """Compiles and times the train step of `config` on `devices`; returns one result dict.

    `compile_only`: lower and compile, then stop (the timing, FLOP and memory fields are None).
    `profile_dir`: after timing, trace `profile_steps` more steps with `jax.profiler.trace` there.
    """
    mesh = parallel.make_mesh(devices)
    method = build_method(config, num_classes)
    views = unlabeled_views(method)
    labeled, unlabeled = config.batch.labeled, config.batch.unlabeled
    parallel.check_divisible(labeled, "--labeled", mesh, config.loss.group_size)
    if views is not None:
        parallel.check_divisible(unlabeled, "--unlabeled", mesh, config.loss.group_size)
    crop = config.data.crop_size
    tx = optim.make_optimizer(config.optim, total_steps=10 ** 6, param_labels=method.param_labels)
    abstract = jax.eval_shape(lambda: method.init(jax.random.PRNGKey(0), (crop, crop, 3)))
    # random floats; integer state (U2PL's queue pointers and counters) keeps its dtype, at zero
    params, method_state = jax.tree.map(lambda x, a: x.astype(a.dtype), random_like(abstract), abstract)
    state = parallel.replicate(train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                                opt_state=tx.init(params), state=method_state), mesh)
    batch = parallel.to_global(synthetic_batch(views, labeled, unlabeled, crop, num_classes,
                                               labeled_views=method.streams()["labeled"].views), mesh)
    step = train.make_train_step(method, tx, mesh, config.seed, steps_per_epoch=1,
                                 offsets=train.stream_offsets(method, config.batch))

    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    images = labeled + (unlabeled if views is not None else 0)
    result = {
        "method": config.method.name, "depth": config.model.depth, "output_stride": config.model.output_stride,
        "crop": crop, "dtype": config.model.dtype, "remat": config.model.remat, "labeled": labeled,
        "unlabeled": unlabeled if views is not None else 0, "devices": len(devices),
        "lower_s": lower_s, "compile_s": compile_s, "compile_only": compile_only,
    }
    if compile_only:
        return result

    metrics = None
    for _ in range(warmup):
        state, metrics = jax.block_until_ready(compiled(state, batch))
    times = []  # each step waited for: includes the launch latency before the device starts
    for _ in range(iters):
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - start)
    start = time.perf_counter()  # queued back to back, as the training loop runs them
    for _ in range(iters):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / iters
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            for _ in range(profile_steps):
                state, metrics = jax.block_until_ready(compiled(state, batch))

    flops = xla_flops(compiled)
    xla_tflops = None if flops is None else flops * len(devices) / 1e12
    ref = reference_tflops(config)
    return dict(
        result, ms_per_step=1e3 * step_s, ms_per_step_synced=1e3 * statistics.median(times),
        ms_per_step_min=1e3 * min(times), images_per_s=images / step_s,
        peak_memory_gib=peak_memory_gib(devices[0]), xla_memory_gib=xla_memory_gib(compiled),
        xla_tflops_per_step=xla_tflops, reference_tflops_per_step=ref,
        xla_vs_reference=None if xla_tflops is None or ref is None else xla_tflops / ref,
        achieved_tflops=None if xla_tflops is None else xla_tflops / step_s / len(devices),
        mfu=None if xla_tflops is None else xla_tflops / step_s / (peak_tflops * len(devices)),
        mfu_reference=None if ref is None else ref / step_s / (peak_tflops * len(devices)),
        final_loss=float(metrics["loss"]),
    )


# ---------------------------------------------------------------------------------------------
# PyTorch comparison
# ---------------------------------------------------------------------------------------------
def run_torch(args) -> dict | None:
    """Runs benchmarks/torch_reference.py on the same grid in a subprocess; its report.

    A failure of the PyTorch side is reported and returns None: the JAX measurements still run.
    """
    out = args.out + ".torch.json"
    cmd = [sys.executable, "-m", "benchmarks.torch_reference", "--out", out, "--method", *args.method,
           "--crop", *map(str, args.crop), "--num-classes", str(args.num_classes)]
    if args.tiny:
        cmd.append("--tiny")
    else:
        dtypes = sorted(set(args.dtype) | {"float32"})  # the float32 baseline is always wanted
        cmd += ["--depth", *map(str, args.depth), "--output-stride", *map(str, args.output_stride),
                "--dtype", *dtypes, "--labeled", str(args.labeled), "--unlabeled", str(args.unlabeled),
                "--warmup", str(args.warmup), "--iters", str(args.iters)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    code = subprocess.run(cmd, env=env, cwd=root).returncode
    if code != 0:
        print(f"benchmarks.torch_reference failed (exit {code}); continuing without the PyTorch comparison",
              file=sys.stderr, flush=True)
        return None
    with open(out) as f:
        return json.load(f)


TORCH_KEYS = ("method", "depth", "output_stride", "crop", "dtype", "labeled", "unlabeled")


def attach_torch(results: list[dict], torch_results: list[dict]) -> None:
    """Adds torch_ms_per_step and speedup_vs_torch (same configuration; and vs torch float32)."""
    def find(r, dtype):
        return next((t for t in torch_results
                     if all(t[k] == (dtype if k == "dtype" else r[k]) for k in TORCH_KEYS)), None)

    for r in (r for r in results if not r["compile_only"]):
        same, fp32 = find(r, r["dtype"]), find(r, "float32")
        r["torch_ms_per_step"] = same and same["ms_per_step"]
        r["speedup_vs_torch"] = same and same["ms_per_step"] / r["ms_per_step"]
        r["speedup_vs_torch_float32"] = fp32 and fp32["ms_per_step"] / r["ms_per_step"]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def print_table(report: dict) -> None:
    """The results as a fixed-width table (the last thing the benchmark prints)."""
    peak = report["peak_tflops"]
    print(f"device: {report['device']} x{report['devices']} (jax {report['jax']}); peak "
          f"{_fmt(peak, '.1f')} TFLOP/s ({report['peak_source']}); results in {report['out']}")
    header = (f"{'method':>10} {'model':>5} {'OS':>3} {'crop':>5} {'dtype':>9} {'batch':>6} {'ms/step':>9} "
              f"{'img/s':>8} {'compile s':>9} {'peak GiB':>8} {'XLA GiB':>8} {'TFLOP':>8} {'/table':>7} "
              f"{'MFU %':>6} {'ref %':>6}")
    has_torch = any("speedup_vs_torch" in r for r in report["results"])
    if has_torch:
        header += f" {'vs torch':>8} {'vs fp32':>8}"
    print(header)
    for r in report["results"]:
        g = r.get
        line = (f"{r['method']:>10} {'R' + str(r['depth']):>5} {r['output_stride']:>3} {r['crop']:>5} "
                f"{r['dtype']:>9} {str(r['labeled']) + '+' + str(r['unlabeled']):>6} "
                f"{_fmt(g('ms_per_step'), '.1f'):>9} {_fmt(g('images_per_s'), '.1f'):>8} "
                f"{r['lower_s'] + r['compile_s']:>9.1f} "
                f"{_fmt(g('peak_memory_gib'), '.2f'):>8} {_fmt(g('xla_memory_gib'), '.2f'):>8} "
                f"{_fmt(g('xla_tflops_per_step'), '.3g'):>8} {_fmt(g('xla_vs_reference'), '.2f'):>7} "
                f"{_fmt(g('mfu') and 100 * g('mfu'), '.1f'):>6} "
                f"{_fmt(g('mfu_reference') and 100 * g('mfu_reference'), '.1f'):>6}")
        if has_torch:
            line += f" {_fmt(g('speedup_vs_torch'), '.2f'):>8} {_fmt(g('speedup_vs_torch_float32'), '.2f'):>8}"
        print(line)


def enable_compilation_cache(directory: str) -> None:
    """Persistent XLA compilation cache in `directory`, caching every program (no size/time floor)."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags (see the module docstring); --tiny overrides the grid."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", nargs="+", choices=sorted(METHOD_CONFIGS),
                        help="default: csl (--tiny: all three)")
    parser.add_argument("--depth", type=int, nargs="+", default=[101], choices=[50, 101])
    parser.add_argument("--output-stride", type=int, nargs="+", default=[16], choices=[8, 16])
    parser.add_argument("--crop", type=int, nargs="+", help="default: 513 (--tiny: 33)")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"],
                        help="default: bfloat16 (--tiny: float32)")
    parser.add_argument("--labeled", type=int, default=8, help="global labeled batch")
    parser.add_argument("--unlabeled", type=int, default=8, help="global unlabeled batch (and mix batch)")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--remat", action="store_true", help="config.model.remat: rematerialise each block")
    parser.add_argument("--num-devices", type=int, default=0,
                        help="first N devices (default: all; the targets are for --num-devices 1)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--peak-tflops", "--peak_tflops", type=float, default=0.0,
                        help="device peak for MFU, TFLOP/s (default: measure a large bf16 matmul)")
    parser.add_argument("--torch", action="store_true", help="also run benchmarks/torch_reference.py")
    parser.add_argument("--compilation-cache", default="",
                        help="persistent XLA compilation cache directory (default: none); a second process "
                             "with the same directory measures the warm compile time")
    parser.add_argument("--compile-only", action="store_true",
                        help="lower and compile each configuration, do not run it (compile-time measurements)")
    parser.add_argument("--profile-dir", default="",
                        help="trace --profile-steps extra steps of each configuration with jax.profiler there")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke test: tiny model, R50 OS8 float32, batch 2+2, one device, 1+2 iterations")
    parser.add_argument("--out", default="train_step.json", help="JSON results file")
    args = parser.parse_args(argv)
    for name in ("labeled", "unlabeled", "warmup", "iters"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.tiny:
        args.method = args.method or ["supervised", "unimatch", "csl"]
        args.crop = args.crop or [33]
        args.depth, args.output_stride, args.labeled, args.unlabeled = [50], [8], 2, 2
        args.dtype = args.dtype or ["float32"]
        args.num_devices, args.warmup, args.iters = 1, 1, 2
    args.dtype = args.dtype or ["bfloat16"]
    args.method = args.method or ["csl"]
    args.crop = args.crop or [513]
    return args


def main(argv=None) -> dict:
    """Runs the benchmark grid; returns the report written to --out."""
    args = parse_args(argv)
    if args.compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    torch_report = run_torch(args) if args.torch else None  # before JAX allocates device memory
    devices = jax.devices()[:args.num_devices or None]
    device = devices[0]
    if args.compile_only:
        peak, source = None, "not measured (--compile-only)"
    elif args.peak_tflops > 0:
        peak, source = args.peak_tflops, "--peak-tflops"
    else:
        size, dtype = PEAK_MATMUL["cpu" if device.platform == "cpu" else "accelerator"]
        peak = measure_peak_tflops(size, dtype)
        source = f"measured: {size}^3 {jnp.dtype(dtype).name} matmul"
    results = []
    for method, depth, stride, crop, dtype in itertools.product(
            args.method, args.depth, args.output_stride, args.crop, args.dtype):
        config = make_config(method, depth, stride, crop, dtype, args.labeled, args.unlabeled, args.tiny,
                             args.remat)
        profile_dir = args.profile_dir and os.path.join(args.profile_dir, f"{method}_{dtype}_os{stride}_{crop}")
        result = bench_one(config, devices, args.num_classes, args.warmup, args.iters, peak, args.compile_only,
                           profile_dir, args.profile_steps)
        print(json.dumps(result), flush=True)
        results.append(result)
    if torch_report is not None:
        attach_torch(results, torch_report["results"])
    report = {"device": f"{device.platform}: {device.device_kind}", "devices": len(devices),
              "jax": jax.__version__, "tiny": args.tiny, "peak_tflops": peak, "peak_source": source,
              "compilation_cache": args.compilation_cache or None, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "out": args.out, "results": results}
    if torch_report is not None:
        report.update(torch_device=torch_report["device"], torch=torch_report["torch"],
                      torch_settings=torch_report.get("settings"), torch_results=torch_report["results"])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
