"""DeepLabV3+ forward and forward+backward speed, compile time and peak memory.

    python -m benchmarks.model_forward --depth 101 --output-stride 16 8 --crop 513 801 \
        --dtype float32 bfloat16 --batch 8 --out bench_model.json
    python -m benchmarks.model_forward --tiny    # CPU smoke test (width 8, one block per layer)

Times are the median of --iters runs after --warmup runs, each ended by block_until_ready.
"fwd" is an eval-mode pass; "fwd+bwd" is a train-mode pass (batch statistics, BN update) with
the gradient of a squared-logit loss w.r.t. the params. Peak memory is the device's
`peak_bytes_in_use` after the configuration ran (monotonic over the process; None on CPU).
The OS8/OS16 time ratio is printed next to the model FLOP ratio (~2.7 for R101 at 513).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from csl_jax.models import DeepLabV3Plus

FLOP_RATIO_OS8_OS16 = 2.7


def random_variables(model, x_shape, seed=0):
    """float32 variables of `model` for inputs `x_shape`, drawn in NumPy (`random_like`)."""
    return random_like(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x_shape), train=False)),
                       seed)


def random_like(abstract, seed=0):
    """float32 arrays for a pytree of ShapeDtypeStructs, drawn in NumPy (cheap: no RNG compile).

    Leaves named 'kernel' are fan-in scaled normals, 'scale' and 'var' ones, the others zeros.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0, std, leaf.shape), jnp.float32)
        return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _timed(compiled, args, warmup, iters):
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _flops(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def bench_one(depth, output_stride, crop, dtype, args):
    """Measure one configuration; returns a dict of results."""
    model = DeepLabV3Plus(args.num_classes, depth=depth, output_stride=output_stride,
                          aspp_rates=(6, 12, 18) if output_stride == 16 else (12, 24, 36),
                          dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
                          **args.model_overrides)
    x_shape = (args.batch, crop, crop, 3)
    variables = random_variables(model, x_shape)
    x = jnp.asarray(np.random.default_rng(1).standard_normal(x_shape), jnp.float32)

    def forward(v, x):
        return model.apply(v, x, train=False)[0]

    def train_grad(v, x):
        def loss(params):
            (logits, _), upd = model.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.mean(jnp.square(logits)), upd
        return jax.grad(loss, has_aux=True)(v["params"])

    result = {"depth": depth, "output_stride": output_stride, "crop": crop, "dtype": dtype,
              "batch": args.batch}
    for name, fn in (("fwd", forward), ("fwd_bwd", train_grad)):
        t = time.perf_counter()
        compiled = jax.jit(fn).lower(variables, x).compile()
        result[f"{name}_compile_s"] = time.perf_counter() - t
        result[f"{name}_gflops"] = _flops(compiled) / 1e9
        result[f"{name}_s"] = _timed(compiled, (variables, x), args.warmup, args.iters)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    result["peak_gib"] = None if peak is None else peak / 2 ** 30
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, nargs="+", default=[101], choices=[50, 101])
    parser.add_argument("--output-stride", type=int, nargs="+", default=[16, 8], choices=[8, 16])
    parser.add_argument("--crop", type=int, nargs="+", default=[513])
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke test: width 8, blocks (1,1,1,1), crop 65, batch 2, 2 iters")
    parser.add_argument("--out", default="model_forward.json", help="JSON results file")
    args = parser.parse_args(argv)
    args.model_overrides = {}
    if args.tiny:
        args.model_overrides = dict(common.TINY_MODEL, head_width=16)
        args.crop, args.batch, args.warmup, args.iters = [65], 2, 1, 2
        args.depth, args.dtype = [50], ["float32"]

    device = jax.devices()[0]
    results = [bench_one(d, s, c, t, args) for d, s, c, t in
               itertools.product(args.depth, args.output_stride, args.crop, args.dtype)]
    ratios = []
    for r8 in (r for r in results if r["output_stride"] == 8):
        key = {k: r8[k] for k in ("depth", "crop", "dtype")}
        r16 = next((r for r in results if r["output_stride"] == 16
                    and all(r[k] == v for k, v in key.items())), None)
        if r16:
            ratios.append(dict(key, fwd_time_ratio=r8["fwd_s"] / r16["fwd_s"],
                               fwd_bwd_time_ratio=r8["fwd_bwd_s"] / r16["fwd_bwd_s"],
                               flop_ratio=r8["fwd_gflops"] / r16["fwd_gflops"],
                               reference_flop_ratio=FLOP_RATIO_OS8_OS16))
    report = {"device": f"{device.platform}: {device.device_kind}", "jax": jax.__version__,
              "tiny": args.tiny, "results": results, "os8_vs_os16": ratios}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)

    print(f"device: {report['device']} (jax {jax.__version__}); results in {args.out}")
    print(f"{'model':>6} {'OS':>3} {'crop':>5} {'dtype':>9} {'batch':>5} {'fwd ms':>9} "
          f"{'f+b ms':>9} {'GFLOP fwd':>10} {'compile s':>10} {'peak GiB':>9}")
    for r in results:
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"{'R' + str(r['depth']):>6} {r['output_stride']:>3} {r['crop']:>5} {r['dtype']:>9} "
              f"{r['batch']:>5} {1e3 * r['fwd_s']:>9.1f} {1e3 * r['fwd_bwd_s']:>9.1f} "
              f"{r['fwd_gflops']:>10.2f} {r['fwd_compile_s'] + r['fwd_bwd_compile_s']:>10.1f} {peak:>9}")
    for q in ratios:
        print(f"OS8/OS16 R{q['depth']} {q['crop']} {q['dtype']}: time x{q['fwd_time_ratio']:.2f} "
              f"(fwd), x{q['fwd_bwd_time_ratio']:.2f} (fwd+bwd); XLA FLOPs x{q['flop_ratio']:.2f}; "
              f"reference FLOP ratio {FLOP_RATIO_OS8_OS16}")
    return report


if __name__ == "__main__":
    main()
