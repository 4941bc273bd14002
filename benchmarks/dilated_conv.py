r"""Dilated 3x3 convolution speed in XLA (performance.md §6): a sweep over dilations, and the ASPP.

    python -m benchmarks.dilated_conv --out dilated_conv.json      # GPU default, about two minutes
    python -m benchmarks.dilated_conv --channels 256 --sizes 41 --dilations 1 2 12 --dtype float32
    python -m benchmarks.dilated_conv --tiny    # CPU smoke test (C 8, maps 9 and 13, 1 + 2 iterations)

XLA may lower a dilated convolution to a padded dense one (openxla/xla PR #32231); DeepLab's OS8
backbone and its ASPP run 53 % of their FLOPs in dilated convs. Everything timed here is forward
+ backward: `jax.grad` of mean(y^2) w.r.t. the conv params and the input, jit-compiled, compute
dtype --dtype (params float32, cast inside the module as in the model), random normal inputs.
Times are the median of --iters runs after --warmup runs, each ended by block_until_ready; the
compile time (lower + compile) is measured separately.

1. Sweep: the model's own 3x3 conv (csl_jax.models.layers.conv: NHWC, no bias, padding =
   dilation, so H and W are kept), C -> C, for every (channels, size, dilation). Per row:
   - nominal_gflops: every tap, 2 B H W 9 C^2, x3 for forward + backward;
   - inbounds_gflops: only the (output pixel, tap) pairs whose input pixel lies inside the map
     (the rest multiply padding zeros), x3; inbounds_fwd_gflops is the forward share;
   - xla_gflops: XLA's cost analysis of the compiled forward + backward program;
     xla_fwd_gflops: of the forward alone, compiled with the kernel already in the compute dtype
     so that the program is the convolution alone. XLA counts in-bounds taps only, so its FLOPs
     fall with the dilation while the nominal ones do not. On CPU, in float32, xla_fwd_gflops ==
     inbounds_fwd_gflops exactly; in bfloat16 the CPU backend computes the conv in float32 and
     adds one convert FLOP per element of input, kernel and output. xla_gflops is 3 x the
     in-bounds count plus the element-wise loss, its gradient and the casts;
   - time_ratio = ms / ms at d = 1 (same channels and size); time_per_inbounds_flop_ratio =
     (ms / in-bounds FLOP) / (the same at d = 1);
   - slow: time_ratio > 1.5 (performance.md: a dilated conv must cost at most ~1.5x the dense
     3x3 of the same shape). When d >= size every off-centre tap reads padding (column 'pad'):
     the in-bounds work is that of a 1x1 conv, so even time_ratio 1 means 9x the time per
     useful FLOP.
2. ASPP: csl_jax.models.ASPP (b0 1x1, three dilated 3x3, image pooling, projection; train mode,
   batch statistics, as in the train step; bn_axis_name None: on one device the model's SyncBN
   over a one-device axis is this local BN) at its OS8 rates 12/24/36 on the OS8 crop-513 R101
   map (B, 65, 65, 2048), and at its OS16 rates 6/12/18 on the OS16 map (33 x 33), each against
   the same module and variables at rates (1, 1, 1), i.e. dense 3x3 convs of the same shapes.
3. verdict, per impl: the number of slow sweep rows and the worst time_ratio with its row.

4. impl (before/after, issue 27): every sweep row and every ASPP row is timed twice, 'xla' = plain
   `lax.conv_general_dilated` autodiff (nn.Conv; its weight gradient is a conv with window_strides
   = d, XLA-GPU's slow path) and 'gemm_wgrad' = the model's conv (csl_jax.models.dilated: same
   forward and input gradient, weight gradient as k*k in-bounds GEMMs). At d = 1 both are the
   same nn.Conv. Ratios (time_ratio, slow, verdict) compare rows of one impl; `speedup` = ms of the
   'xla' row / ms of this row (same shape and dilation; 1 for 'xla'). The 'xla' ASPP swaps
   layers.conv's DilatedConv for nn.Conv while it is traced (`plain_xla_convs`); the dense ASPP
   (rates 1/1/1, nn.Conv either way) is timed once and shared.

Prints one JSON line per measurement while running, writes the JSON report to --out, and prints
the tables last.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.model_forward import random_variables
from benchmarks.train_step import xla_flops
from csl_jax.models import ASPP, layers
from csl_jax.models.layers import conv

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SLOW_TIME_RATIO = 1.5
KERNEL_SIZE = 3
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
DENSE_RATES = (1, 1, 1)
IMPLS = ("xla", "gemm_wgrad")  # before / after: plain lax autodiff, the model's GEMM weight gradient


# ---------------------------------------------------------------------------------------------
# FLOP counts
# ---------------------------------------------------------------------------------------------
def inbounds_taps_1d(n: int, dilation: int, kernel_size: int = KERNEL_SIZE) -> int:
    """(output position, tap) pairs of one axis whose input index lies in [0, n).

    Stride 1, padding dilation * (k - 1) / 2, so there are n outputs. Output o, tap i reads input
    o + i * d - pad, i.e. o + offset: that is in range for n - |offset| outputs (none if
    |offset| >= n).
    """
    pad = dilation * (kernel_size - 1) // 2
    return sum(max(0, n - abs(i * dilation - pad)) for i in range(kernel_size))


def inbounds_fwd_flops(batch: int, height: int, width: int, channels_in: int, channels_out: int,
                       dilation: int, kernel_size: int = KERNEL_SIZE) -> int:
    """Forward FLOPs (2 per MAC) of the taps that read inside the input: 2 B taps2d Cin Cout."""
    taps2d = inbounds_taps_1d(height, dilation, kernel_size) * inbounds_taps_1d(width, dilation, kernel_size)
    return 2 * batch * taps2d * channels_in * channels_out


def nominal_fwd_flops(batch: int, height: int, width: int, channels_in: int, channels_out: int,
                      kernel_size: int = KERNEL_SIZE) -> int:
    """Forward FLOPs counting every tap (padding included): 2 B H W k^2 Cin Cout."""
    return 2 * batch * height * width * kernel_size ** 2 * channels_in * channels_out


# ---------------------------------------------------------------------------------------------
# What is timed
# ---------------------------------------------------------------------------------------------
def make_conv(channels: int, dilation: int, dtype, impl: str = "gemm_wgrad") -> nn.Conv:
    """The 3x3 conv C -> C, padding = dilation, no bias: the model's (layers.conv) for 'gemm_wgrad',
    with plain nn.Conv (lax autodiff) for 'xla'. Same parameter either way."""
    with plain_xla_convs(impl == "xla"):
        return conv(channels, KERNEL_SIZE, dilation=dilation, name="conv", dtype=dtype)


@contextlib.contextmanager
def plain_xla_convs(enabled: bool = True):
    """While active (and `enabled`), layers.conv builds nn.Conv for dilated convs too (impl 'xla'); the
    BatchNorms stay as they are (`layers.kernels('reference')` would switch them too)."""
    if not enabled:
        yield
        return
    saved = layers.DilatedConv
    layers.DilatedConv = nn.Conv
    try:
        yield
    finally:
        layers.DilatedConv = saved


def conv_params(channels: int, seed: int = 0) -> dict:
    """{'kernel': (3, 3, C, C) float32}, random normal with std 1 / sqrt(fan in)."""
    rng = np.random.default_rng(seed)
    std = 1.0 / np.sqrt(KERNEL_SIZE * KERNEL_SIZE * channels)
    return {"kernel": jnp.asarray(rng.normal(0.0, std, (KERNEL_SIZE, KERNEL_SIZE, channels, channels)),
                                  jnp.float32)}


def random_input(shape, dtype, seed: int = 1) -> jax.Array:
    """Standard normal array of `shape` in `dtype` (never zeros, so no sparsity shortcut)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32), dtype)


def conv_grad_fn(module):
    """(params, x) -> (d params, d x) of mean(conv(x)^2): the forward + backward that is timed."""
    def loss(params, x):
        y = module.apply({"params": params}, x)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))
    return jax.grad(loss, argnums=(0, 1))


def aspp_grad_fn(module):
    """(params, batch_stats, x) -> ((d params, d x), new batch_stats) of mean(ASPP(x)^2), train mode."""
    def loss(params, batch_stats, x):
        y, updates = module.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])
        return jnp.mean(jnp.square(y.astype(jnp.float32))), updates["batch_stats"]
    return jax.grad(loss, argnums=(0, 2), has_aux=True)


def compile_timed(fn, args):
    """(compiled, lower + compile seconds) of jax.jit(fn) for `args`."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def run_timed(compiled, args, warmup: int, iters: int) -> list[float]:
    """Seconds of each of `iters` calls after `warmup` calls, each ended by block_until_ready."""
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return times


def _gflops(flops):
    return None if flops is None else flops / 1e9


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
def bench_conv(channels: int, size: int, dilation: int, args, impl: str = "gemm_wgrad") -> dict:
    """One sweep row of `impl` (without the d = 1 ratios and the speedup)."""
    dtype = DTYPES[args.dtype]
    module = make_conv(channels, dilation, dtype, impl)
    params = conv_params(channels)
    x = random_input((args.batch, size, size, channels), dtype)
    compiled, compile_s = compile_timed(conv_grad_fn(module), (params, x))
    times = run_timed(compiled, (params, x), args.warmup, args.iters)
    fwd_params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
    fwd, fwd_compile_s = compile_timed(lambda p, x: module.apply({"params": p}, x), (fwd_params, x))
    inbounds_fwd = inbounds_fwd_flops(args.batch, size, size, channels, channels, dilation)
    return {
        "channels": channels, "size": size, "dilation": dilation, "impl": impl, "batch": args.batch,
        "dtype": args.dtype, "ms": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times),
        "compile_s": compile_s, "fwd_compile_s": fwd_compile_s,
        "nominal_gflops": 3 * nominal_fwd_flops(args.batch, size, size, channels, channels) / 1e9,
        "inbounds_gflops": 3 * inbounds_fwd / 1e9, "inbounds_fwd_gflops": inbounds_fwd / 1e9,
        "xla_gflops": _gflops(xla_flops(compiled)), "xla_fwd_gflops": _gflops(xla_flops(fwd)),
        "all_taps_in_padding": dilation >= size,
    }


def add_ratios(rows: list[dict]) -> None:
    """time_ratio, time_per_inbounds_flop_ratio and slow against the d = 1 row of the same shape and
    impl; speedup = ms of the 'xla' row of the same shape and dilation / ms."""
    for r in rows:
        base = next(b for b in rows if b["dilation"] == 1 and b["impl"] == r["impl"]
                    and (b["channels"], b["size"]) == (r["channels"], r["size"]))
        xla = next(b for b in rows if b["impl"] == "xla"
                   and (b["channels"], b["size"], b["dilation"]) == (r["channels"], r["size"], r["dilation"]))
        r["speedup"] = xla["ms"] / r["ms"]
        r["time_ratio"] = r["ms"] / base["ms"]
        r["time_per_inbounds_flop_ratio"] = ((r["ms"] / r["inbounds_gflops"])
                                             / (base["ms"] / base["inbounds_gflops"]))
        r["slow"] = r["time_ratio"] > SLOW_TIME_RATIO


def bench_aspp_module(rates, size: int, args, impl: str = "gemm_wgrad") -> dict:
    """ms, compile s and XLA GFLOP of the model's ASPP at `rates` (forward + backward, train mode)
    with `impl`'s dilated convs."""
    dtype = DTYPES[args.dtype]
    module = ASPP(tuple(rates), args.aspp_features, dtype=dtype, bn_axis_name=None)
    shape = (args.aspp_batch, size, size, args.aspp_in)
    variables = random_variables(module, shape)
    x = random_input(shape, dtype)
    call = (variables["params"], variables["batch_stats"], x)
    with plain_xla_convs(impl == "xla"):  # the convs are built while the ASPP is traced
        compiled, compile_s = compile_timed(aspp_grad_fn(module), call)
    times = run_timed(compiled, call, args.warmup, args.iters)
    return {"ms": 1e3 * statistics.median(times), "compile_s": compile_s,
            "xla_gflops": _gflops(xla_flops(compiled))}


def bench_aspp(name: str, rates, size: int, args) -> list[dict]:
    """The ASPP at `rates`, one row per impl, against the same ASPP at DENSE_RATES (timed once) on a
    (B, size, size, Cin) map."""
    dense = bench_aspp_module(DENSE_RATES, size, args)
    rows = []
    for impl in IMPLS:
        dil = bench_aspp_module(rates, size, args, impl)
        rows.append({"name": name, "rates": list(rates), "impl": impl, "size": size, "in_channels": args.aspp_in,
                     "features": args.aspp_features, "batch": args.aspp_batch, "dtype": args.dtype,
                     "ms": dil["ms"], "ms_dense": dense["ms"], "time_ratio": dil["ms"] / dense["ms"],
                     "compile_s": dil["compile_s"], "compile_s_dense": dense["compile_s"],
                     "xla_gflops": dil["xla_gflops"], "xla_gflops_dense": dense["xla_gflops"]})
    for r in rows:
        r["speedup"] = rows[0]["ms"] / r["ms"]
    return rows


def verdict(rows: list[dict]) -> dict:
    """Per impl: the number of slow rows and the row with the worst time_ratio."""
    out = {}
    for impl in IMPLS:
        mine = [r for r in rows if r["impl"] == impl]
        worst = max(mine, key=lambda r: r["time_ratio"])
        out[impl] = {"criterion": f"time_ratio > {SLOW_TIME_RATIO}", "slow_rows": sum(r["slow"] for r in mine),
                     "rows": len(mine), "worst_time_ratio": worst["time_ratio"],
                     "worst_row": {k: worst[k] for k in ("channels", "size", "dilation")}}
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def print_table(report: dict) -> None:
    """The results as fixed-width tables (the last thing the benchmark prints)."""
    print(f"device: {report['device']} (jax {report['jax']}); {report['dtype']}, fwd+bwd; "
          f"total {report['total_s']:.1f} s; results in {report['out']}")
    for impl, v in report["verdict"].items():
        w = v["worst_row"]
        print(f"verdict {impl}: {v['slow_rows']}/{v['rows']} rows slow ({v['criterion']}); worst "
              f"x{v['worst_time_ratio']:.2f} at C {w['channels']}, {w['size']}^2, d {w['dilation']}")
    print(f"{'C':>5} {'size':>5} {'d':>3} {'impl':>10} {'pad':>3} {'ms':>9} {'speedup':>7} {'x d=1':>6} {'/FLOP':>7} "
          f"{'GFLOP':>9} {'in-bnd':>9} {'XLA':>9} {'XLA fwd':>9} {'compile s':>9} {'slow':>4}")
    for r in report["sweep"]:
        print(f"{r['channels']:>5} {r['size']:>5} {r['dilation']:>3} {r['impl']:>10} "
              f"{'yes' if r['all_taps_in_padding'] else '':>3} {r['ms']:>9.3f} {r['speedup']:>7.2f} "
              f"{r['time_ratio']:>6.2f} {r['time_per_inbounds_flop_ratio']:>7.2f} "
              f"{r['nominal_gflops']:>9.4g} {r['inbounds_gflops']:>9.4g} {_fmt(r['xla_gflops'], '.4g'):>9} "
              f"{_fmt(r['xla_fwd_gflops'], '.4g'):>9} {r['compile_s']:>9.2f} {'SLOW' if r['slow'] else '':>4}")
    print(f"{'ASPP':>5} {'rates':>9} {'impl':>10} {'map':>13} {'feat':>5} {'ms':>9} {'speedup':>7} {'ms dense':>9} "
          f"{'x dense':>7} {'XLA GFLOP':>10} {'dense':>9} {'compile s':>9}")
    for a in report["aspp"]:
        shape = f"{a['batch']}x{a['size']}^2x{a['in_channels']}"
        print(f"{a['name']:>5} {'/'.join(map(str, a['rates'])):>9} {a['impl']:>10} {shape:>13} {a['features']:>5} "
              f"{a['ms']:>9.3f} {a['speedup']:>7.2f} {a['ms_dense']:>9.3f} {a['time_ratio']:>7.2f} "
              f"{_fmt(a['xla_gflops'], '.4g'):>10} {_fmt(a['xla_gflops_dense'], '.4g'):>9} "
              f"{a['compile_s'] + a['compile_s_dense']:>9.2f}")


def markdown(report: dict) -> str:
    """The ASPP comparison and the sweep as Markdown tables (for benchmarks/suite.py)."""
    lines = [f"Dilated 3x3 convolutions, {report['dtype']}, forward + backward ({report['device']}); impl 'xla' = "
             "lax autodiff (before), 'gemm_wgrad' = the model's GEMM weight gradient (after):", "",
             "| ASPP | rates | impl | map | ms | speed-up vs xla | ms dense (rates 1/1/1) | dilated / dense |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {a['name']} | {'/'.join(map(str, a['rates']))} | {a['impl']} "
              f"| {a['batch']}x{a['size']}²x{a['in_channels']} | {a['ms']:.2f} | {a['speedup']:.2f} "
              f"| {a['ms_dense']:.2f} | {a['time_ratio']:.2f} |" for a in report["aspp"]]
    lines.append("")
    for impl, v in report["verdict"].items():
        w = v["worst_row"]
        lines.append(f"Sweep, {impl}: {v['slow_rows']} of {v['rows']} rows slow ({v['criterion']}); worst "
                     f"x{v['worst_time_ratio']:.2f} at C {w['channels']}, {w['size']}², d {w['dilation']}.")
    lines += ["", "| C | map | d | impl | ms | speed-up vs xla | time / d=1 | time per in-bounds FLOP / d=1 "
              "| all off-centre taps in padding |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['channels']} | {r['size']}² | {r['dilation']} | {r['impl']} | {r['ms']:.3f} | {r['speedup']:.2f} "
              f"| {r['time_ratio']:.2f} | {r['time_per_inbounds_flop_ratio']:.2f} "
              f"| {'yes' if r['all_taps_in_padding'] else ''} |" for r in report["sweep"]]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags (see the module docstring); --tiny overrides the grid."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, nargs="+", default=[256, 512], help="C (in = out)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[33, 41, 65],
                        help="square map sides (OS16 513, OS8 321, OS8 513)")
    parser.add_argument("--dilations", type=int, nargs="+", default=[1, 2, 4, 12, 24, 36],
                        help="1 is always added (the baseline of the ratios)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="compute dtype")
    parser.add_argument("--aspp-size", type=int, default=65, help="OS8 map side (R101 at crop 513)")
    parser.add_argument("--aspp-os16-size", type=int, default=33, help="OS16 map side (crop 513)")
    parser.add_argument("--aspp-in", type=int, default=2048, help="ASPP input channels (R101 c4)")
    parser.add_argument("--aspp-features", type=int, default=256, help="ASPP width (the model's head_width)")
    parser.add_argument("--aspp-batch", type=int, help="default: --batch (train-mode BN needs >= 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke test: batch 1 (ASPP 2), C 8, maps 9 and 13, d 1 2 12, ASPP 16 -> 8 "
                             "on 9^2 (OS8) and 5^2 (OS16), 1 + 2 iterations")
    parser.add_argument("--out", default="dilated_conv.json", help="JSON results file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.channels, args.sizes, args.dilations = 1, [8], [9, 13], [1, 2, 12]
        args.aspp_batch, args.aspp_in, args.aspp_features = 2, 16, 8
        args.aspp_size, args.aspp_os16_size = 9, 5
        args.warmup, args.iters = 1, 2
    args.aspp_batch = args.aspp_batch or args.batch
    for name in ("batch", "iters", "aspp_in", "aspp_features", "aspp_size", "aspp_os16_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.aspp_batch < 2:
        parser.error(f"--aspp-batch must be >= 2 (train-mode BN of the image pooling), got {args.aspp_batch}")
    for name in ("channels", "sizes", "dilations"):
        values = sorted(set(getattr(args, name)) | ({1} if name == "dilations" else set()))
        if values[0] < 1:
            parser.error(f"--{name} must be positive, got {values}")
        setattr(args, name, values)
    return args


def main(argv=None) -> dict:
    """Runs the sweep and the ASPP comparison; returns the report written to --out."""
    args = parse_args(argv)
    start = time.perf_counter()
    device = jax.devices()[0]
    aspp = []  # first: the model's own question
    for name, stride, size in (("OS8", 8, args.aspp_size), ("OS16", 16, args.aspp_os16_size)):
        for result in bench_aspp(name, ASPP_RATES[stride], size, args):
            print(json.dumps(result), flush=True)
            aspp.append(result)
    sweep = []
    for channels, size, dilation, impl in itertools.product(args.channels, args.sizes, args.dilations, IMPLS):
        row = bench_conv(channels, size, dilation, args, impl)
        print(json.dumps(row), flush=True)
        sweep.append(row)
    add_ratios(sweep)
    report = {"device": f"{device.platform}: {device.device_kind}", "jax": jax.__version__,
              "tiny": args.tiny, "dtype": args.dtype, "warmup": args.warmup, "iters": args.iters,
              "out": args.out, "total_s": time.perf_counter() - start,
              "sweep": sweep, "aspp": aspp, "verdict": verdict(sweep)}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
