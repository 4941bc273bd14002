r"""Structural audit of the real train step's jaxpr: conv / dot FLOPs by dtype and kind, reductions, collectives,
saved residuals. Traces only (no XLA compilation), so it runs on CPU at full size.

    python -m benchmarks.jaxpr_audit --method csl unimatch --depth 101 --output-stride 16 --crop 513 \
        --dtype bfloat16 --labeled 8 --unlabeled 8 --out jaxpr_audit.json      # the defaults (~30 s each on CPU)
    python -m benchmarks.jaxpr_audit --tiny     # tiny model (common.TINY_MODEL), R50 OS8, crop 33, 2 + 2

Each configuration is built as benchmarks/train_step.py builds it (`make_config`, `synthetic_batch`,
`csl_jax.train.make_train_step` on a one-device mesh) but from abstract values: `step.trace(state, batch)` gives
the jaxpr of one train step, which is walked recursively (pjit, shard_map, custom_vjp / custom_jvp, remat, cond
and scan bodies; a scan body counts `length` times, a while body once). Per train step:

- convs (`conv_general_dilated`): count and FLOPs by operand dtype and by kind. FLOPs = 2 |out| K C, with K the
  rhs's spatial size and C its input-feature size (per group), divided by the lhs dilation's product
  ("all taps": PyTorch's convention, the cost model's; the taps on an lhs-dilation hole are never counted);
  "in bounds" counts per spatial axis only the (output, tap) pairs that read a real input element (not padding,
  not a hole), XLA's convention. Kind, from the dimension numbers JAX's transpose rules give the convs of an
  NHWC / HWIO forward conv (flax's layout): `fwd` lhs spec (0, 3, 1, 2), rhs spec (3, 2, 0, 1); `dgrad`
  (`_conv_general_dilated_transpose_lhs`: the kernel's I axis as output feature) rhs spec (2, 3, 0, 1);
  `wgrad` (`_conv_general_dilated_transpose_rhs`: the activation's channel as batch) lhs spec (3, 0, 1, 2);
  `other` anything else. A wgrad's window strides are the forward conv's rhs dilation: the "stride-dilation
  wgrads" (window stride > 1, an activation-sized rhs = the cotangent) are the dilated convs' wgrads;
- dots (`dot_general`): FLOPs 2 |out| x (contracted size), by operand dtypes ('float32+bfloat16' when mixed);
- activation-sized reductions (`reduce_*`, `argmax`, `argmin`, `cumsum` ... whose input has >= 1e5 elements, a
  threshold set by --reduce-min): count and elements by input dtype and primitive;
- collectives (psum, pmax, all_gather, ...) counted by primitive; equations (all, sub-jaxprs included);
- saved residuals of the method's loss, as `jax._src.ad_checkpoint.saved_residuals` reports them for
  `method.loss(params, ...)` differentiated w.r.t. params (exactly the `jax.value_and_grad` of
  `make_train_step`), traced inside the same shard_map with the same StepContext fields: bytes and counts by
  dtype and rank, those computed in the loss apart from those that are its inputs (params, batch, state).

Every configuration is audited with `--kernels` (default both): 'fast', the train-time kernels (fused BatchNorm,
GEMM weight gradients of the dilated convs, bf16 logit resize; csl_jax.models.layers.kernels), and 'reference',
the plain JAX formulations they replace: the before / after of issue 27 in one table.

Prints one JSON line per configuration while running, writes the JSON report, and prints the table last.
"""
from __future__ import annotations

import argparse
import collections
import functools
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from benchmarks.train_step import (batch_streams, make_config, reference_tflops, synthetic_batch,
                                   unlabeled_views)
from csl_jax import optim, parallel, train
from csl_jax.methods import StepContext, build_method
from csl_jax.models import layers

REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax",
              "argmin", "cumsum", "cummax", "cumlogsumexp", "reduce_precision_sum"}
COLLECTIVES = {"psum", "psum_invariant", "pmax", "pmin", "all_gather", "all_to_all", "ppermute",
               "reduce_scatter", "psum_scatter", "all_gather_invariant", "pbroadcast"}
NHWC_KINDS = {((0, 3, 1, 2), (3, 2, 0, 1)): "fwd", ((0, 3, 1, 2), (2, 3, 0, 1)): "dgrad"}


# ---------------------------------------------------------------------------------------------
# Walking the jaxpr
# ---------------------------------------------------------------------------------------------
def _sub_jaxprs(eqn):
    """(jaxpr, multiplicity) of each sub-jaxpr of an equation (its params' Jaxprs / ClosedJaxprs)."""
    times = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr, times
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v, times


def iter_eqns(jaxpr, times: int = 1):
    """(equation, multiplicity) of every equation of `jaxpr` (a Jaxpr) and, depth first, of its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        yield eqn, times
        for sub, n in _sub_jaxprs(eqn):
            yield from iter_eqns(sub, times * n)


@functools.lru_cache(maxsize=None)
def _axis_taps(n: int, out: int, k: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
    """(output, tap) pairs along one axis that read a real input element (not padding, not a dilation hole)."""
    pos = np.arange(out)[:, None] * stride + np.arange(k)[None, :] * rhs_dil - pad_lo
    ok = (pos >= 0) & (pos <= (n - 1) * lhs_dil) & (pos % lhs_dil == 0)
    return int(ok.sum())


def conv_info(eqn) -> dict:
    """Kind, dtype, FLOPs (all taps, in bounds) and shapes of one conv_general_dilated equation."""
    p = eqn.params
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    kind = NHWC_KINDS.get((tuple(lhs_spec), tuple(rhs_spec)))
    if kind is None and tuple(lhs_spec) == (3, 0, 1, 2):
        kind = "wgrad"
    kind = kind or "other"
    lhs_dil = tuple(p.get("lhs_dilation") or (1,) * (lhs.ndim - 2))
    rhs_dil = tuple(p.get("rhs_dilation") or (1,) * (lhs.ndim - 2))
    strides = tuple(p["window_strides"])
    k_spatial = [rhs.shape[d] for d in rhs_spec[2:]]
    c_in = rhs.shape[rhs_spec[1]]
    out_spatial = [out.shape[d] for d in out_spec[2:]]
    out_other = out.shape[out_spec[0]] * out.shape[out_spec[1]]
    all_taps = 2.0 * out_other * np.prod(out_spatial) * np.prod(k_spatial) * c_in / np.prod(lhs_dil)
    taps = [_axis_taps(lhs.shape[lhs_spec[2 + i]], out_spatial[i], k_spatial[i], strides[i], p["padding"][i][0],
                       lhs_dil[i], rhs_dil[i]) for i in range(len(out_spatial))]
    in_bounds = 2.0 * out_other * np.prod(taps) * c_in
    dtype = _dtypes(eqn)
    stride_dilation = kind == "wgrad" and max(strides) > 1 and np.prod(k_spatial) > np.prod(out_spatial)
    return dict(kind=kind, dtype=dtype, all_taps=float(all_taps), in_bounds=float(in_bounds),
                stride_dilation_wgrad=bool(stride_dilation), lhs=tuple(lhs.shape), rhs=tuple(rhs.shape),
                out=tuple(out.shape), strides=strides, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil)


def _dtypes(eqn) -> str:
    """The operand dtypes of an equation: 'bfloat16', or 'float32+bfloat16' when they differ."""
    names = list(dict.fromkeys(jnp.dtype(v.aval.dtype).name for v in eqn.invars))
    return "+".join(names)


def dot_flops(eqn) -> float:
    """2 |out| x (product of the contracted dimensions) of a dot_general equation."""
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    k = int(np.prod([lhs.shape[d] for d in lhs_contract])) if lhs_contract else 1
    return 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * k


def audit_jaxpr(jaxpr, reduce_min: int = 100_000) -> dict:
    """The audit of a jaxpr (a Jaxpr or ClosedJaxpr): see the module docstring for the quantities."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    conv = {"count": collections.Counter(), "all_taps": collections.Counter(), "in_bounds": collections.Counter(),
            "by_dtype": collections.Counter(), "count_by_dtype": collections.Counter()}
    sd = {"count": 0, "all_taps": 0.0}
    dots = {"flops": collections.Counter(), "count": collections.Counter()}
    reductions = {"count": collections.Counter(), "elements": collections.Counter()}
    collectives, primitives = collections.Counter(), collections.Counter()
    loops = collections.Counter()
    equations = 0
    for eqn, n in iter_eqns(jaxpr):
        name = eqn.primitive.name
        equations += n
        primitives[name] += n
        if name in ("while", "cond", "scan"):
            loops[name] += n
        if name == "conv_general_dilated":
            c = conv_info(eqn)
            conv["count"][c["kind"]] += n
            conv["all_taps"][c["kind"]] += n * c["all_taps"]
            conv["in_bounds"][c["kind"]] += n * c["in_bounds"]
            conv["by_dtype"][c["dtype"]] += n * c["all_taps"]
            conv["count_by_dtype"][c["dtype"]] += n
            if c["stride_dilation_wgrad"]:
                sd["count"] += n
                sd["all_taps"] += n * c["all_taps"]
        elif name == "dot_general":
            dots["flops"][_dtypes(eqn)] += n * dot_flops(eqn)
            dots["count"][_dtypes(eqn)] += n
        elif name in REDUCTIONS or name.startswith("reduce_"):
            size = int(np.prod(eqn.invars[0].aval.shape))
            if size >= reduce_min:
                key = f"{jnp.dtype(eqn.invars[0].aval.dtype).name} {name}"
                reductions["count"][key] += n
                reductions["elements"][key] += n * size
        if name in COLLECTIVES:
            collectives[name] += n
    return {
        "equations": equations, "top_level_equations": len(jaxpr.eqns),
        "conv_count": dict(conv["count"]), "conv_tflops_all_taps": _tera(conv["all_taps"]),
        "conv_tflops_in_bounds": _tera(conv["in_bounds"]), "conv_tflops_by_dtype": _tera(conv["by_dtype"]),
        "conv_count_by_dtype": dict(conv["count_by_dtype"]),
        "conv_tflops_total": sum(conv["all_taps"].values()) / 1e12,
        "conv_tflops_total_in_bounds": sum(conv["in_bounds"].values()) / 1e12,
        "stride_dilation_wgrads": {"count": sd["count"], "tflops": sd["all_taps"] / 1e12},
        "dot_tflops_by_dtype": _tera(dots["flops"]), "dot_count_by_dtype": dict(dots["count"]),
        "reductions": {"min_elements": reduce_min, "count": dict(reductions["count"]),
                       "gelements": {k: v / 1e9 for k, v in reductions["elements"].items()}},
        "collectives": dict(collectives), "psum_count": sum(v for k, v in collectives.items() if "psum" in k),
        "control_flow": dict(loops),
    }


def _tera(counter) -> dict:
    return {k: v / 1e12 for k, v in counter.items()}


# ---------------------------------------------------------------------------------------------
# Saved residuals
# ---------------------------------------------------------------------------------------------
def summarize_residuals(residuals) -> dict:
    """saved_residuals' (aval, source) list -> bytes and counts by 'computed' / 'input', dtype and rank."""
    out = {}
    for aval, src in residuals:
        origin = "input" if src.startswith(("from the argument", "from a constant", "from a literal")) else "computed"
        shape = getattr(aval, "shape", ())
        dtype = jnp.dtype(aval.dtype)
        key = f"{dtype.name} {len(shape)}-D"
        entry = out.setdefault(origin, {}).setdefault(key, {"count": 0, "mbytes": 0.0})
        entry["count"] += 1
        entry["mbytes"] += float(np.prod(shape)) * dtype.itemsize / 1e6
    for origin in out.values():
        for entry in origin.values():
            entry["mbytes"] = round(entry["mbytes"], 3)
    return out


def loss_residuals(method, state, batch, mesh, seed: int, offsets: dict) -> list:
    """`saved_residuals` of `method.loss` w.r.t. the params, traced as make_train_step traces it (same
    shard_map, StepContext fields, rng); a list of (aval, source). Traces only (eval_shape)."""
    from jax._src.ad_checkpoint import saved_residuals

    found = []
    seed_key = jax.random.PRNGKey(seed)

    def per_device(ts, b):
        ctx = StepContext(rng=jax.random.fold_in(seed_key, ts.step), step=ts.step,
                          device_index=jax.lax.axis_index(parallel.AXIS), num_devices=mesh.devices.size,
                          steps_per_epoch=1, stream_offsets=offsets)
        found.extend(saved_residuals(lambda params: method.loss(params, ts.state, b, ctx), ts.params))
        return jnp.zeros((), jnp.float32)

    jax.eval_shape(parallel.shard_map(per_device, mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=P()),
                   state, batch)
    return found


# ---------------------------------------------------------------------------------------------
# The real train step
# ---------------------------------------------------------------------------------------------
def abstract_inputs(config, num_classes: int, mesh):
    """(method, tx, abstract TrainState, abstract batch, offsets) of `config`, as train_step.bench_one builds them."""
    method = build_method(config, num_classes)
    views = unlabeled_views(method)
    crop = config.data.crop_size
    tx = optim.make_optimizer(config.optim, total_steps=10 ** 6, param_labels=method.param_labels)
    params, method_state = jax.eval_shape(lambda: method.init(jax.random.PRNGKey(0), (crop, crop, 3)))
    opt_state = jax.eval_shape(tx.init, params)
    state = train.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state,
                             state=method_state)
    host = synthetic_batch(views, config.batch.labeled, config.batch.unlabeled, crop, num_classes,
                           labeled_views=method.streams()["labeled"].views, streams=batch_streams(method, config))
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), host)
    offsets = train.stream_offsets(method, config.batch)
    return method, tx, state, batch, offsets


def audit_config(config, num_classes: int = 21, reduce_min: int = 100_000, residuals: bool = True) -> dict:
    """The audit of one configuration's train step on a one-device mesh (trace only)."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    method, tx, state, batch, offsets = abstract_inputs(config, num_classes, mesh)
    step = train.make_train_step(method, tx, mesh, config.seed, steps_per_epoch=1, offsets=offsets)
    start = time.perf_counter()
    jaxpr = step.trace(state, batch).jaxpr
    trace_s = time.perf_counter() - start
    result = {"method": config.method.name, "depth": config.model.depth,
              "output_stride": config.model.output_stride, "crop": config.data.crop_size,
              "dtype": config.model.dtype, "labeled": config.batch.labeled, "unlabeled": config.batch.unlabeled,
              "trace_s": trace_s, "cost_model_tflops": reference_tflops(config, num_classes)}
    result.update(audit_jaxpr(jaxpr, reduce_min))
    if residuals:
        start = time.perf_counter()
        result["saved_residuals"] = summarize_residuals(
            loss_residuals(method, state, batch, mesh, config.seed, offsets))
        result["residuals_s"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _num(value, spec: str) -> str:
    """format(value, spec), or 3 significant digits for a nonzero value that would print as 0.000 (tiny model)."""
    text = format(value, spec)
    return format(value, ".3g") if value and spec.startswith(".") and float(text) == 0 else text


def _kinds(d: dict, spec: str = "") -> str:
    return " / ".join(_num(d.get(k, 0), spec) for k in ("fwd", "dgrad", "wgrad")) + (
        f" (+{_num(d['other'], spec)} other)" if d.get("other") else "")


def _by_key(d: dict, spec: str) -> str:
    return ", ".join(f"{k} {_num(v, spec)}" for k, v in sorted(d.items())) or "-"


def table_rows(r: dict) -> list[tuple[str, str]]:
    """(quantity, value) rows of one configuration's audit."""
    res = r.get("saved_residuals", {}).get("computed", {})
    res_rows = [(f"residuals {k} (count, MB)", f"{v['count']}, {v['mbytes']:.1f}")
                for k, v in sorted(res.items(), key=lambda kv: -kv[1]["mbytes"]) if v["mbytes"] >= 0.001]
    return [
        ("conv TFLOP/step all taps (cost model)", f"{_num(r['conv_tflops_total'], '.3f')} "
         f"({'n/a' if r['cost_model_tflops'] is None else format(r['cost_model_tflops'], '.3f')})"),
        ("conv TFLOP in-bounds taps", _num(r["conv_tflops_total_in_bounds"], ".3f")),
        ("convs fwd / dgrad / wgrad", _kinds(r["conv_count"])),
        ("conv TFLOP fwd / dgrad / wgrad", _kinds(r["conv_tflops_all_taps"], ".3f")),
        ("stride-dilation wgrads (count, TFLOP)",
         f"{r['stride_dilation_wgrads']['count']}, {_num(r['stride_dilation_wgrads']['tflops'], '.3f')}"),
        ("conv TFLOP by operand dtype", _by_key(r["conv_tflops_by_dtype"], ".3f")),
        ("dot TFLOP by operand dtype", _by_key(r["dot_tflops_by_dtype"], ".4f")),
        (f"reductions >= {r['reductions']['min_elements']:.0e} el. (count)", _by_key(r["reductions"]["count"], "d")),
        ("psum equations", str(r["psum_count"])),
        ("jaxpr equations (all / top level)", f"{r['equations']} / {r['top_level_equations']}"),
    ] + res_rows


def print_table(report: dict) -> None:
    """The audit as a quantity x configuration table (the last thing printed)."""
    results = report["results"]
    rows = [dict(table_rows(r)) for r in results]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    heads = [f"{r['method']} R{r['depth']} OS{r['output_stride']} {r['crop']} {r['dtype']} "
             f"{r['labeled']}+{r['unlabeled']} {r.get('kernels', 'fast')}" for r in results]
    width = max(len(k) for k in keys)
    print(f"jaxpr audit per train step (trace only, jax {report['jax']}); results in {report['out']}")
    for k in keys:
        print(f"{k:<{width}}  " + "  |  ".join(row.get(k, "-") for row in rows))
    print(f"{'(columns)':<{width}}  " + "  |  ".join(heads))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", nargs="+", default=["csl", "unimatch"])
    parser.add_argument("--depth", type=int, default=101, choices=[50, 101])
    parser.add_argument("--output-stride", type=int, default=16, choices=[8, 16])
    parser.add_argument("--crop", type=int, default=0, help="default 513 (--tiny: 33)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--labeled", type=int, default=8)
    parser.add_argument("--unlabeled", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--reduce-min", type=int, default=0,
                        help="reductions whose input has at least this many elements are reported "
                             "(default 100000; --tiny: 1000)")
    parser.add_argument("--no-residuals", action="store_true", help="skip the saved-residuals trace")
    parser.add_argument("--kernels", nargs="+", choices=layers.KERNELS, default=["fast", "reference"],
                        help="csl_jax.models.layers.kernels of each audit: 'fast' (the train-time kernels) and "
                             "'reference' (the plain JAX formulations they replace): the before/after")
    parser.add_argument("--tiny", action="store_true", help="tiny model (common.TINY_MODEL), R50 OS8, crop 33, 2+2")
    parser.add_argument("--out", default="jaxpr_audit.json")
    args = parser.parse_args(argv)
    if args.tiny:
        args.depth, args.output_stride, args.labeled, args.unlabeled = 50, 8, 2, 2
    args.crop = args.crop or (33 if args.tiny else 513)
    args.reduce_min = args.reduce_min or (1000 if args.tiny else 100_000)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = []
    for method, kernels in itertools.product(args.method, args.kernels):
        config = make_config(method, args.depth, args.output_stride, args.crop, args.dtype, args.labeled,
                             args.unlabeled, tiny=args.tiny)
        with layers.kernels(kernels):  # read while the step is traced
            result = audit_config(config, args.num_classes, args.reduce_min, residuals=not args.no_residuals)
        result["kernels"] = kernels
        print(json.dumps(result), flush=True)
        results.append(result)
    report = {"jax": jax.__version__, "tiny": args.tiny, "out": args.out, "results": results}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
