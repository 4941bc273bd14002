"""Fused train-mode BatchNorm (csl_jax/models/batchnorm.py) against float64 references.

References: NumPy float64 forward (biased variance for y, unbiased n / (n - 1) for the running
variance) and the closed-form BN backward in float64, itself checked against JAX autodiff of the
two-pass formula under `jax.enable_x64`. bf16 cases compare against the reference on the bf16-rounded
inputs (what the BN actually sees).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals
from jax.extend import core as jax_core
from jax.sharding import Mesh, PartitionSpec as P

from csl_jax import parallel
from csl_jax.models.batchnorm import batch_norm_train
from csl_jax.models.layers import BatchNorm

C = 6
MOMENTUM = 0.9


def _variables(c=C, seed=1, mean=None):
    r = np.random.default_rng(seed)
    return {"params": {"scale": r.uniform(0.5, 1.5, c).astype(np.float32),
                       "bias": r.normal(size=c).astype(np.float32)},
            "batch_stats": {"mean": (r.normal(size=c) if mean is None else mean).astype(np.float32),
                            "var": r.uniform(0.5, 1.5, c).astype(np.float32)}}


def _as_f64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def _ref_forward(x, v, eps=1e-5):
    """float64: y (flattened to (n, C)), batch mean, biased var, new running mean and var."""
    x = _as_f64(x).reshape(-1, x.shape[-1])
    n = x.shape[0]
    mean, var = x.mean(0), x.var(0)
    p, s = v["params"], v["batch_stats"]
    y = (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]
    return (y, mean, var, MOMENTUM * s["mean"] + (1 - MOMENTUM) * mean,
            MOMENTUM * s["var"] + (1 - MOMENTUM) * var * n / (n - 1))


def _ref_backward(x, scale, dy, eps=1e-5):
    """Closed-form float64 BN backward: (dx, d scale, d bias), dx flattened to (n, C)."""
    x, dy = _as_f64(x).reshape(-1, x.shape[-1]), _as_f64(dy).reshape(-1, x.shape[-1])
    mean, var = x.mean(0), x.var(0)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    dx = scale * rstd * (dy - dy.mean(0) - xhat * (dy * xhat).mean(0))
    return dx, (dy * xhat).sum(0), dy.sum(0)


def _train(bn, v, x):
    """(y, new batch_stats) of a train-mode apply with batch_stats mutable."""
    y, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    return y, upd["batch_stats"]


def _vjp(bn, v, x, ct):
    """(dx, d scale, d bias) of bn's train-mode output for the cotangent ct."""
    def f(params, x):
        return _train(bn, {"params": params, "batch_stats": v["batch_stats"]}, x)[0]

    _, pullback = jax.vjp(f, v["params"], x)
    dp, dx = pullback(jnp.asarray(ct, x.dtype))
    return dx, dp["scale"], dp["bias"]


def _inputs(dtype, loc=3.0, scale=2.0, shape=(4, 5, 3, C), seed=0):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(loc, scale, shape).astype(np.float32), dtype)
    ct = jnp.asarray(r.normal(size=shape).astype(np.float32), dtype)
    return x, ct


def test_closed_form_backward_equals_float64_autodiff_of_the_two_pass_formula():
    x, ct = _inputs(jnp.float32)
    v = _variables()
    with jax.enable_x64(True):
        def bn64(x, scale, bias):
            mean = jnp.mean(x, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
            return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias

        args = [np.asarray(a, np.float64) for a in (x, v["params"]["scale"], v["params"]["bias"])]
        _, pullback = jax.vjp(bn64, *args)
        dx, ds, db = (np.asarray(g) for g in pullback(np.asarray(ct, np.float64)))
    ref = _ref_backward(x, v["params"]["scale"], ct)
    np.testing.assert_allclose(dx.reshape(-1, C), ref[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ds, ref[1], rtol=1e-10)
    np.testing.assert_allclose(db, ref[2], rtol=1e-10)


# (dtype, y atol relative to max|y|, running-stat rtol, dx atol relative to max|dx|, d scale/bias rtol)
CASES = {"float32": (jnp.float32, 2e-6, 1e-6, 2e-6, 5e-6),
         "bfloat16": (jnp.bfloat16, 8e-3, 1e-5, 8e-3, 5e-6)}


@pytest.mark.parametrize("case", CASES)
def test_fused_forward_and_running_stats_match_float64(case):
    dtype, y_tol, stat_tol, _, _ = CASES[case]
    x, _ = _inputs(dtype)
    v = _variables()
    y, stats = _train(BatchNorm(), v, x)
    assert y.dtype == dtype and stats["mean"].dtype == stats["var"].dtype == jnp.float32
    ref_y, _, _, ref_mean, ref_var = _ref_forward(x, v)
    np.testing.assert_allclose(_as_f64(y).reshape(-1, C), ref_y, atol=y_tol * np.abs(ref_y).max())
    np.testing.assert_allclose(stats["mean"], ref_mean, rtol=stat_tol)
    np.testing.assert_allclose(stats["var"], ref_var, rtol=stat_tol)
    # the two-pass BN (fused=False) gives the same numbers
    y2, stats2 = _train(BatchNorm(fused=False), v, x)
    np.testing.assert_allclose(_as_f64(y), _as_f64(y2), atol=y_tol * np.abs(ref_y).max())
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=stat_tol), stats, stats2)


@pytest.mark.parametrize("case", CASES)
def test_fused_gradients_match_float64(case):
    dtype, _, _, dx_tol, p_tol = CASES[case]
    x, ct = _inputs(dtype)
    v = _variables()
    dx, ds, db = _vjp(BatchNorm(), v, x, ct)
    assert dx.dtype == dtype and ds.dtype == db.dtype == jnp.float32
    ref_dx, ref_ds, ref_db = _ref_backward(x, v["params"]["scale"], ct)
    np.testing.assert_allclose(_as_f64(dx).reshape(-1, C), ref_dx, atol=dx_tol * np.abs(ref_dx).max())
    np.testing.assert_allclose(ds, ref_ds, rtol=p_tol, atol=p_tol * np.abs(ref_ds).max())
    np.testing.assert_allclose(db, ref_db, rtol=p_tol, atol=p_tol * np.abs(ref_db).max())


def test_output_dtype_and_param_dtype():
    x, ct = _inputs(jnp.bfloat16)
    v = _variables()
    y, _ = _train(BatchNorm(dtype=jnp.float32), v, x)
    assert y.dtype == jnp.float32
    ref_y = _ref_forward(x, v)[0]
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(-1, C), ref_y, atol=1e-5)
    v16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), v)
    v16["batch_stats"] = v["batch_stats"]
    bn16 = BatchNorm(param_dtype=jnp.bfloat16)
    _, ds, db = _vjp(bn16, v16, x, ct)
    assert ds.dtype == db.dtype == jnp.bfloat16


@pytest.mark.parametrize("loc", [100.0, 1000.0])
def test_large_mean_over_std_keeps_precision(loc):
    """|mean| / std = 100 and 1000 with the running mean far away (0): the shift keeps float32
    precision (an unshifted one-pass variance would lose it all at 1000: 1e6 * 2^-24 ~ 6 % of var)."""
    x, ct = _inputs(jnp.float32, loc=loc, scale=1.0, shape=(8, 6, 5, C))
    v = _variables(mean=np.zeros(C))
    y, stats = _train(BatchNorm(), v, x)
    ref_y, ref_bmean, ref_bvar, ref_mean, ref_var = _ref_forward(x, v)
    # float32 rounding of x - mean at |x| ~ loc alone is ~ loc * 2^-24 relative to std 1
    y_tol = 8 * loc * 2.0 ** -24 + 1e-6
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(-1, C), ref_y, atol=y_tol * np.abs(ref_y).max())
    np.testing.assert_allclose(stats["mean"], ref_mean, rtol=1e-6)
    np.testing.assert_allclose(stats["var"], ref_var, rtol=1e-5)
    dx, ds, db = _vjp(BatchNorm(), v, x, ct)
    ref_dx, ref_ds, ref_db = _ref_backward(x, v["params"]["scale"], ct)
    np.testing.assert_allclose(np.asarray(dx, np.float64).reshape(-1, C), ref_dx, atol=y_tol * np.abs(ref_dx).max())
    np.testing.assert_allclose(ds, ref_ds, atol=y_tol * np.abs(ref_ds).max() + 1e-5 * np.abs(ref_db).max())
    np.testing.assert_allclose(db, ref_db, rtol=1e-5)
    # bf16 input at |mean| / std = 1000: exact statistics of the rounded values
    xb = jnp.asarray(x, jnp.bfloat16)
    _, stats_b = _train(BatchNorm(), v, xb)
    _, _, _, ref_mean_b, ref_var_b = _ref_forward(xb, v)
    np.testing.assert_allclose(stats_b["mean"], ref_mean_b, rtol=1e-6)
    np.testing.assert_allclose(stats_b["var"], ref_var_b, rtol=1e-5)


def _sync_train_and_grads(bn, v, x, ct, check_vma):
    """SyncBN over 8 devices: y, batch_stats, dx, d scale, d bias (param grads as the step sees them
    before its pmean: per-device local sums with check_vma off, summed over devices with it on)."""
    mesh = Mesh(np.array(jax.devices()[:8]), (parallel.AXIS,))

    def per_device(v, x, ct):
        y, stats = _train(bn, v, x)
        dx, ds, db = _vjp(bn, v, x, ct)
        if check_vma:
            return y, stats, dx, ds, db
        return y, stats, dx, ds[None], db[None]

    param_spec = P() if check_vma else P(parallel.AXIS)
    specs = dict(in_specs=(P(), P(parallel.AXIS), P(parallel.AXIS)),
                 out_specs=(P(parallel.AXIS), P(), P(parallel.AXIS), param_spec, param_spec))
    if check_vma:
        fn = jax.shard_map(per_device, mesh=mesh, check_vma=True, **specs)
    else:
        fn = parallel.shard_map(per_device, mesh, specs["in_specs"], specs["out_specs"])
    y, stats, dx, ds, db = jax.jit(fn)(v, x, ct)
    if not check_vma:
        ds, db = ds.sum(0), db.sum(0)
    return y, stats, dx, ds, db


@pytest.mark.parametrize("check_vma", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_sync_batchnorm_over_8_devices_equals_global_batch(case, check_vma):
    assert jax.device_count() >= 8
    dtype, y_tol, stat_tol, dx_tol, p_tol = CASES[case]
    x, ct = _inputs(dtype, loc=1.0, scale=3.0, shape=(16, 3, 2, C))
    v = _variables()
    y, stats, dx, ds, db = _sync_train_and_grads(BatchNorm(axis_name=parallel.AXIS), v, x, ct, check_vma)
    y1, stats1 = _train(BatchNorm(), v, x)
    ref_y, _, _, ref_mean, ref_var = _ref_forward(x, v)  # n = 16 * 3 * 2 over all devices
    np.testing.assert_allclose(_as_f64(y).reshape(-1, C), ref_y, atol=y_tol * np.abs(ref_y).max())
    np.testing.assert_allclose(_as_f64(y), _as_f64(y1), atol=y_tol * np.abs(ref_y).max())
    np.testing.assert_allclose(stats["mean"], ref_mean, rtol=stat_tol)
    np.testing.assert_allclose(stats["var"], ref_var, rtol=stat_tol)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=stat_tol), stats, stats1)
    ref_dx, ref_ds, ref_db = _ref_backward(x, v["params"]["scale"], ct)
    np.testing.assert_allclose(_as_f64(dx).reshape(-1, C), ref_dx, atol=dx_tol * np.abs(ref_dx).max())
    np.testing.assert_allclose(ds, ref_ds, rtol=p_tol, atol=p_tol * np.abs(ref_ds).max())
    np.testing.assert_allclose(db, ref_db, rtol=p_tol, atol=p_tol * np.abs(ref_db).max())
    # the two-pass SyncBN gives the same gradients as the step sees them
    _, _, dx2, ds2, db2 = _sync_train_and_grads(
        BatchNorm(axis_name=parallel.AXIS, fused=False), v, x, ct, check_vma)
    np.testing.assert_allclose(_as_f64(dx), _as_f64(dx2), atol=dx_tol * np.abs(ref_dx).max())
    np.testing.assert_allclose(ds, ds2, rtol=p_tol, atol=p_tol * np.abs(ref_ds).max())
    np.testing.assert_allclose(db, db2, rtol=p_tol, atol=p_tol * np.abs(ref_db).max())


@pytest.mark.parametrize("running_mean", [0.0, 1000.0])
def test_sync_batchnorm_keeps_precision_whatever_the_running_mean(running_mean):
    """|mean| / std = 1000 over 8 devices, each device's batch offset by a different amount (so that
    combining per-device moments matters): every device shifts by a value of its own batch and the
    moments are combined after one gathering psum, so the statistics keep float32 precision whether the
    running mean is 1000 std away (0) or at the mean; nothing is shifted by the running mean."""
    x, _ = _inputs(jnp.float32, loc=1000.0, scale=1.0, shape=(16, 4, 4, C))
    x = x + jnp.repeat(jnp.arange(8, dtype=jnp.float32) * 0.5, 2)[:, None, None, None]  # per-device offsets
    mesh = Mesh(np.array(jax.devices()[:8]), (parallel.AXIS,))
    bn = BatchNorm(axis_name=parallel.AXIS)
    fn = jax.jit(parallel.shard_map(lambda v, x: _train(bn, v, x), mesh, (P(), P(parallel.AXIS)),
                                    (P(parallel.AXIS), P())))
    v = _variables(mean=np.full(C, running_mean))
    _, stats = fn(v, x)
    _, _, _, ref_mean, ref_var = _ref_forward(x, v)
    np.testing.assert_allclose(stats["mean"], ref_mean, rtol=1e-6)
    np.testing.assert_allclose(stats["var"], ref_var, rtol=2e-5)


# ----------------------------------------------------------------------------- structure
def _eqns(jaxpr):
    """All equations of a (closed) jaxpr, sub-jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                if isinstance(sub, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
                    yield from _eqns(sub)


def _two_bn_net(fused, axis_name):
    """Two train-mode BNs in a row (ReLU in between), params/batch_stats of both."""
    bns = [BatchNorm(axis_name=axis_name, fused=fused, name=f"bn{i}") for i in range(2)]

    def apply(variables, x):
        stats = {}
        for i, bn in enumerate(bns):
            name = f"bn{i}"
            x, stats[name] = _train(bn, {k: variables[k][name] for k in variables}, x)
            x = jax.nn.relu(x) if i == 0 else x
        return x, stats

    v = {"params": {}, "batch_stats": {}}
    for i in range(2):
        vi = _variables(seed=i)
        for k in v:
            v[k][f"bn{i}"] = vi[k]
    return apply, v


@pytest.mark.parametrize("check_vma", [False, True])
def test_one_collective_per_direction_per_batchnorm(check_vma):
    apply, v = _two_bn_net(True, parallel.AXIS)
    x, ct = _inputs(jnp.bfloat16, shape=(16, 4, 4, C))
    mesh = Mesh(np.array(jax.devices()[:8]), (parallel.AXIS,))

    def fwd(v, x):
        return apply(v, x)[0]

    def fwd_bwd(v, x, ct):
        y, pullback = jax.vjp(lambda p, x: apply({"params": p, "batch_stats": v["batch_stats"]}, x)[0],
                              v["params"], x)
        dp, dx = pullback(ct)
        return y, dx, jax.tree.map(lambda g: g[None], dp)

    def counts(fn, *args, n_out):
        out = P(parallel.AXIS) if n_out == 1 else (P(parallel.AXIS),) * n_out
        specs = ((P(),) + (P(parallel.AXIS),) * (len(args) - 1), out)
        if check_vma:
            sm = jax.shard_map(fn, mesh=mesh, in_specs=specs[0], out_specs=specs[1], check_vma=True)
        else:
            sm = parallel.shard_map(fn, mesh, *specs)
        names = [e.primitive.name for e in _eqns(jax.make_jaxpr(sm)(*args))]
        return sum(n.startswith(("psum", "all_gather", "all_reduce")) for n in names)

    assert counts(fwd, v, x, n_out=1) == 2  # forward only: one collective per BN
    assert counts(fwd_bwd, v, x, ct, n_out=3) == 4  # 2 BNs x (forward + backward)


def _big_input(dtype):
    return jnp.asarray(np.random.default_rng(0).normal(2.0, 1.5, (4, 8, 8, 16)), dtype)


@pytest.mark.parametrize("fused", [True, False])
def test_saved_residuals_have_no_float32_activation(fused):
    x = _big_input(jnp.bfloat16)
    v = _variables(c=16)

    def loss(params, x):
        y, _ = _train(BatchNorm(fused=fused), {"params": params, "batch_stats": v["batch_stats"]}, x)
        return jnp.sum(jax.nn.relu(y).astype(jnp.float32))

    res = saved_residuals(loss, v["params"], x)
    big_f32 = [(a, why) for a, why in res if a.size >= x.size and a.dtype == jnp.float32]
    if fused:
        assert big_f32 == [], big_f32
        assert any(a.size == x.size and a.dtype == jnp.bfloat16 for a, _ in res)
    else:  # the test can see them: the two-pass autodiff BN saves float32 activations
        assert big_f32


@pytest.mark.parametrize("fused,most", [(True, 4), (False, 6)])
def test_grad_jaxpr_activation_sized_reductions(fused, most):
    x = _big_input(jnp.bfloat16)
    v = _variables(c=16)
    ct = jnp.ones_like(x)

    def fwd_bwd(params, x, ct):
        f = lambda p, x: _train(BatchNorm(fused=fused), {"params": p, "batch_stats": v["batch_stats"]}, x)[0]  # noqa
        _, pullback = jax.vjp(f, params, x)
        return pullback(ct)

    eqns = list(_eqns(jax.make_jaxpr(fwd_bwd)(v["params"], x, ct)))
    reductions = [e for e in eqns if e.primitive.name.startswith("reduce") and e.invars[0].aval.size == x.size]
    # fused: 2 forward (S1, S2) + 2 backward (sum dy, sum dy * xhat); two-pass autodiff: 6
    assert len(reductions) == most, [e.primitive.name for e in reductions]
    assert all(e.primitive.name == "reduce_sum" for e in reductions)
    if fused:  # every activation-sized reduction reads x (upcast in the fusion) or dy, nothing saved
        assert all(e.outvars[0].aval.dtype == jnp.float32 for e in reductions)


# ----------------------------------------------------------------------------- semantics
def test_single_value_per_channel_is_an_error():
    with pytest.raises(ValueError, match="more than one value per channel"):
        BatchNorm().init(jax.random.PRNGKey(0), jnp.ones((1, 1, 1, 3)), use_running_average=False)


def test_no_update_during_init_or_when_not_mutable_and_names_unchanged():
    x, _ = _inputs(jnp.float32)
    fused = BatchNorm().init(jax.random.PRNGKey(0), x, use_running_average=False)
    plain = BatchNorm(fused=False).init(jax.random.PRNGKey(0), x, use_running_average=False)
    assert jax.tree.structure(fused) == jax.tree.structure(plain)
    assert {k: sorted(v) for k, v in fused.items()} == {"params": ["bias", "scale"], "batch_stats": ["mean", "var"]}
    assert all(a.shape == (C,) and a.dtype == jnp.float32 for a in jax.tree.leaves(fused))
    np.testing.assert_array_equal(fused["batch_stats"]["mean"], np.zeros(C))
    np.testing.assert_array_equal(fused["batch_stats"]["var"], np.ones(C))
    v = _variables()
    y = BatchNorm().apply(v, x, use_running_average=False)  # batch_stats not mutable: no update, no error
    np.testing.assert_allclose(y, _train(BatchNorm(), v, x)[0])


def test_eval_path_uses_running_statistics():
    x, _ = _inputs(jnp.float32)
    v = _variables()
    y = BatchNorm().apply(v, x, use_running_average=True)
    s = v["params"]["scale"] / np.sqrt(v["batch_stats"]["var"] + 1e-5)
    np.testing.assert_allclose(y, (np.asarray(x) - v["batch_stats"]["mean"]) * s + v["params"]["bias"], atol=1e-5)


def test_mean_and_var_outputs_carry_no_gradient():
    x, _ = _inputs(jnp.float32)
    ones = jnp.ones(C)

    def f(x):
        _, mean, var = batch_norm_train(x, ones, ones)
        return jnp.sum(mean) + jnp.sum(var)

    np.testing.assert_array_equal(jax.grad(f)(x), np.zeros(x.shape))
