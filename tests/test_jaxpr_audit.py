"""benchmarks/jaxpr_audit.py: conv / dot FLOP counts, conv kinds, dtype buckets, recursion, residuals."""
import itertools
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import jaxpr_audit, train_step

NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, stride=1, dilation=1, groups=1):
    """A PyTorch-padded conv (p = d (k - 1) / 2), as layers.conv builds it."""
    p = dilation * (w.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)), rhs_dilation=(dilation, dilation),
                                        dimension_numbers=NHWC, feature_group_count=groups)


def _audit(fn, *args):
    return jaxpr_audit.audit_jaxpr(jax.make_jaxpr(fn)(*args), reduce_min=100)


def _brute_force_flops(n, h, w, k, stride, dilation, cin, cout, in_bounds):
    """2 * multiply-adds of a PyTorch-padded conv, tap by tap (plain loops)."""
    p = dilation * (k - 1) // 2
    oh, ow = (h + 2 * p - dilation * (k - 1) - 1) // stride + 1, (w + 2 * p - dilation * (k - 1) - 1) // stride + 1
    taps = 0
    for i, j, a, b in itertools.product(range(oh), range(ow), range(k), range(k)):
        y, x = i * stride - p + a * dilation, j * stride - p + b * dilation
        taps += (not in_bounds) or (0 <= y < h and 0 <= x < w)
    return 2 * n * taps * cin * cout


@pytest.mark.parametrize("h,k,stride,dilation,cin,cout", [(9, 3, 1, 1, 4, 6), (10, 3, 2, 1, 3, 5),
                                                          (11, 1, 1, 1, 4, 2), (9, 3, 1, 2, 2, 3),
                                                          (8, 7, 2, 1, 3, 4)])
def test_forward_conv_flops_match_brute_force_and_cost_model(h, k, stride, dilation, cin, cout):
    x = jnp.zeros((2, h, h + 1, cin), jnp.float32)
    w = jnp.zeros((k, k, cin, cout), jnp.float32)
    r = _audit(lambda a, b: _conv(a, b, stride, dilation), x, w)
    assert r["conv_count"] == {"fwd": 1}
    for in_bounds, key in ((False, "conv_tflops_all_taps"), (True, "conv_tflops_in_bounds")):
        want = _brute_force_flops(2, h, h + 1, k, stride, dilation, cin, cout, in_bounds)
        assert r[key]["fwd"] * 1e12 == pytest.approx(want, rel=1e-12)
        if dilation == 1:  # benchmarks.train_step's cost model (PyTorch padding, undilated)
            model, _ = train_step.conv_flops((h, h + 1), k, stride, cin, cout, in_bounds)
            assert r[key]["fwd"] * 1e12 == pytest.approx(2 * model, rel=1e-12)


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_single_conv_gradient_kinds(stride, dilation):
    x = jnp.zeros((2, 12, 12, 4), jnp.float32)
    w = jnp.zeros((3, 3, 4, 8), jnp.float32)
    r = _audit(jax.grad(lambda a, b: jnp.sum(_conv(a, b, stride, dilation)), argnums=(0, 1)), x, w)
    assert r["conv_count"] == {"fwd": 1, "dgrad": 1, "wgrad": 1}
    fwd = r["conv_tflops_all_taps"]["fwd"]
    # every multiply-add of the forward has one in the input gradient and one in the weight gradient (12 even)
    assert r["conv_tflops_all_taps"]["dgrad"] == pytest.approx(fwd, rel=1e-12)
    assert r["conv_tflops_all_taps"]["wgrad"] == pytest.approx(fwd, rel=1e-12)
    assert r["conv_tflops_in_bounds"]["wgrad"] == pytest.approx(r["conv_tflops_in_bounds"]["fwd"], rel=1e-12)
    assert r["conv_tflops_in_bounds"]["dgrad"] == pytest.approx(r["conv_tflops_in_bounds"]["fwd"], rel=1e-12)
    # the weight gradient of a dilated conv is a conv with window stride = the dilation, over the cotangent
    assert r["stride_dilation_wgrads"]["count"] == (dilation > 1)
    # only the weight gradient: no dgrad
    r = _audit(jax.grad(lambda b: jnp.sum(_conv(x, b, stride, dilation))), w)
    assert r["conv_count"] == {"fwd": 1, "wgrad": 1}


def test_depthwise_conv_gradient():
    x = jnp.zeros((2, 8, 8, 6), jnp.float32)
    w = jnp.zeros((3, 3, 1, 6), jnp.float32)
    r = _audit(jax.grad(lambda a, b: jnp.sum(_conv(a, b, groups=6)), argnums=(0, 1)), x, w)
    assert r["conv_count"] == {"fwd": 1, "dgrad": 1, "wgrad": 1}
    assert r["conv_tflops_all_taps"]["fwd"] * 1e12 == pytest.approx(2 * 2 * 8 * 8 * 9 * 6, rel=1e-12)
    assert r["conv_tflops_all_taps"]["wgrad"] == pytest.approx(r["conv_tflops_all_taps"]["fwd"], rel=1e-12)


def test_tiny_conv_net_total_and_dtype_buckets():
    """Two convs in bfloat16, one in float32, a mixed-dtype dot, a reduction: each in its bucket."""
    x = jnp.zeros((2, 16, 16, 3), jnp.bfloat16)
    w1, w2 = jnp.zeros((3, 3, 3, 8), jnp.bfloat16), jnp.zeros((1, 1, 8, 4), jnp.bfloat16)
    w3 = jnp.zeros((3, 3, 4, 2), jnp.float32)
    m = jnp.zeros((5, 8), jnp.float32)

    def net(x, w1, w2, w3, m):
        y = _conv(_conv(x, w1, stride=2), w2).astype(jnp.float32)
        z = _conv(y, w3)
        d = jax.lax.dot_general(m, z.astype(jnp.bfloat16), (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return jnp.sum(d) + jnp.max(z)

    r = _audit(net, x, w1, w2, w3, m)
    f1 = 2 * 2 * 8 * 8 * 9 * 3 * 8
    f2 = 2 * 2 * 8 * 8 * 1 * 8 * 4
    f3 = 2 * 2 * 8 * 8 * 9 * 4 * 2
    assert r["conv_tflops_by_dtype"]["bfloat16"] * 1e12 == pytest.approx(f1 + f2, rel=1e-12)
    assert r["conv_tflops_by_dtype"]["float32"] * 1e12 == pytest.approx(f3, rel=1e-12)
    assert r["conv_count_by_dtype"] == {"bfloat16": 2, "float32": 1}
    assert r["dot_tflops_by_dtype"] == {"float32+bfloat16": pytest.approx(2 * 5 * 2 * 8 * 2 * 8 / 1e12)}
    assert r["reductions"]["count"] == {"float32 reduce_max": 1, "float32 reduce_sum": 1}


def test_recursion_into_sub_jaxprs():
    """Convs inside jit, remat, custom_vjp and a scan of length 3 are all found, the scan's 3 times."""
    x = jnp.zeros((1, 6, 6, 2), jnp.float32)
    w = jnp.zeros((3, 3, 2, 2), jnp.float32)

    @jax.custom_vjp
    def cv(a):
        return _conv(a, w)

    cv.defvjp(lambda a: (cv(a), None), lambda _, g: (g,))

    def fn(a):
        a = jax.jit(lambda v: _conv(v, w))(a)
        a = jax.checkpoint(lambda v: _conv(v, w))(a)
        a = cv(a)
        a, _ = jax.lax.scan(lambda c, _: (_conv(c, w), None), a, None, length=3)
        return jax.lax.psum(a, "i")

    jaxpr = jax.make_jaxpr(jax.vmap(fn, axis_name="i"))(x[None])
    r = jaxpr_audit.audit_jaxpr(jaxpr)
    assert r["conv_count"] == {"fwd": 6}
    assert r["psum_count"] == 1 and r["control_flow"] == {"scan": 1}


def test_summarize_residuals():
    from jax._src.ad_checkpoint import saved_residuals

    x = jnp.zeros((2, 8, 8, 3), jnp.bfloat16)
    w = jnp.zeros((3, 3, 3, 4), jnp.bfloat16)
    res = jaxpr_audit.summarize_residuals(saved_residuals(lambda w: jnp.sum(jax.nn.relu(_conv(x, w))), w))
    assert res["computed"]["bfloat16 4-D"]["count"] >= 1 or res["computed"]["bool 4-D"]["count"] >= 1
    assert set(res) <= {"computed", "input"}


def test_tiny_train_step_audit(tmp_path, capsys):
    """The real CSL train step of the tiny model in bfloat16 (trace only): JSON + table, structure, and the
    structural changes of the train-time kernels (layers.kernels 'fast') against the plain JAX formulations
    ('reference') they replace: no stride-dilation weight-gradient convs (their wgrads are GEMMs), no
    float32-operand dots (bf16 logit resize), BatchNorm: fewer psums and float32 reductions (4 per BN instead
    of 6) and no activation-sized float32 residuals (the 4 left are the loss's float32 logit maps)."""
    out = tmp_path / "audit.json"
    report = jaxpr_audit.main(["--tiny", "--method", "csl", "--out", str(out)])
    assert [r["kernels"] for r in json.loads(out.read_text())["results"]] == ["fast", "reference"]
    r, ref = report["results"]
    assert ref["stride_dilation_wgrads"]["count"] > 0 and r["stride_dilation_wgrads"]["count"] == 0
    assert r["conv_count"]["wgrad"] == ref["conv_count"]["wgrad"] - ref["stride_dilation_wgrads"]["count"]
    assert "float32" in ref["dot_tflops_by_dtype"] and set(r["dot_tflops_by_dtype"]) == {"bfloat16"}
    assert r["psum_count"] < ref["psum_count"]
    bn_reductions = ref["reductions"]["count"]["float32 reduce_sum"] - r["reductions"]["count"]["float32 reduce_sum"]
    assert bn_reductions > 0 and bn_reductions % 2 == 0  # 2 fewer per train-mode BatchNorm
    f32 = r["saved_residuals"]["computed"]["float32 4-D"]["count"]
    assert f32 <= 4 < bn_reductions <= ref["saved_residuals"]["computed"]["float32 4-D"]["count"]
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("(columns)")
    assert r["conv_count"]["fwd"] > 0 and r["conv_count"]["dgrad"] > 0 and r["conv_count"]["wgrad"] > 0
    assert set(r["conv_count_by_dtype"]) == {"bfloat16"}  # bfloat16 training: every conv in bfloat16
    assert r["conv_tflops_total_in_bounds"] <= r["conv_tflops_total"]
    assert r["psum_count"] > 0 and r["equations"] > 1000
    assert r["saved_residuals"]["computed"]
    # the final logit resize (9 -> 33) runs bfloat16 dots (layers.resize_logits): no float32-operand dot
    # produces or reads a crop-sized map
    crop = 33
    jaxpr = _tiny_step_jaxpr()
    for eqn, _ in jaxpr_audit.iter_eqns(jaxpr.jaxpr):
        if eqn.primitive.name == "dot_general" and "float32" in jaxpr_audit._dtypes(eqn):
            shapes = [v.aval.shape for v in (*eqn.invars, *eqn.outvars)]
            assert not any(crop in s[1:3] and len(s) == 4 for s in shapes), str(eqn)


def _tiny_step_jaxpr():
    from csl_jax import parallel, train

    config = train_step.make_config("csl", 50, 8, 33, "bfloat16", 2, 2, tiny=True)
    mesh = parallel.make_mesh(jax.devices()[:1])
    method, tx, state, batch, offsets = jaxpr_audit.abstract_inputs(config, 21, mesh)
    step = train.make_train_step(method, tx, mesh, config.seed, steps_per_epoch=1, offsets=offsets)
    return step.trace(state, batch).jaxpr
