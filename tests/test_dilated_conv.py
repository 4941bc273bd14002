"""csl_jax.models.dilated: the dilated conv with a GEMM weight gradient against lax autodiff and NumPy.

References: `lax.conv_general_dilated` differentiated by JAX (the path it replaces) and a float64
NumPy loop over taps and output pixels; the model check builds the same DeepLabV3+ with plain
`nn.Conv` everywhere.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from csl_jax.models import DeepLabV3Plus, dilated, layers
from csl_jax.models.layers import conv

TINY = dict(width=8, blocks=(1, 1, 2, 3), head_width=16, reduce_width=8)
# (batch, H, W, Cin, Cout, kernel size, dilation)
CASES = [
    (2, 7, 5, 3, 4, 3, 1),
    (2, 7, 5, 3, 4, 3, 2),
    (1, 6, 9, 5, 3, 3, 3),
    (2, 5, 8, 4, 6, 3, 5),   # d = H: the off-centre rows read padding only, the columns do not
    (1, 4, 4, 3, 2, 3, 4),   # d = H = W: only the centre tap reads the input
    (1, 3, 5, 2, 2, 3, 12),  # d > H, W
    (1, 6, 7, 2, 3, 5, 2),   # 5x5 kernel
]


def _random(shape, dtype, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32), dtype)


def _lax_conv(x, kernel, d):
    """The plain conv as nn.Conv calls it, written out here (independent of dilated.py)."""
    p = d * (kernel.shape[0] - 1) // 2
    return lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)), rhs_dilation=(d, d),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _close(got, ref, rtol):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * max(np.abs(ref).max(), 1e-30))


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", CASES)
def test_output_and_gradients_equal_lax_autodiff(case, dtype, rtol):
    b, h, w, cin, cout, k, d = case
    x = _random((b, h, w, cin), dtype, 1)
    kernel = _random((k, k, cin, cout), dtype, 2) / np.sqrt(k * k * cin).astype(np.float32)
    kernel = kernel.astype(dtype)
    y, vjp = jax.vjp(lambda x, kern: dilated.dilated_conv(x, kern, d), x, kernel)
    y_ref, vjp_ref = jax.vjp(lambda x, kern: _lax_conv(x, kern, d), x, kernel)
    dy = _random(y_ref.shape, dtype, 3)
    (dx, dk), (dx_ref, dk_ref) = vjp(dy), vjp_ref(dy)
    assert y.dtype == dx.dtype == dk.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))  # same op
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32))  # same conv
    _close(np.asarray(dk, np.float32), np.asarray(dk_ref, np.float32), rtol)
    # under jit as well
    dk_jit = jax.jit(lambda x, kern, g: jax.vjp(lambda kk: dilated.dilated_conv(x, kk, d), kern)[1](g)[0])(
        x, kernel, dy)
    _close(np.asarray(dk_jit, np.float32), np.asarray(dk_ref, np.float32), rtol)


def _numpy_weight_grad(x, dy, k, d):
    """float64 dW[i, j] = sum over in-bounds (b, output pixel) of outer(x[input pixel], dy[output pixel])."""
    b, h, w, cin = x.shape
    p = d * (k - 1) // 2
    dw = np.zeros((k, k, cin, dy.shape[-1]))
    for i in range(k):
        for j in range(k):
            for oy in range(h):
                for ox in range(w):
                    iy, ix = oy + i * d - p, ox + j * d - p
                    if 0 <= iy < h and 0 <= ix < w:
                        dw[i, j] += x[:, iy, ix, :].T @ dy[:, oy, ox, :]
    return dw


@pytest.mark.parametrize("case", [(2, 5, 7, 3, 4, 3, 2), (1, 6, 4, 2, 3, 3, 4)])
def test_weight_grad_equals_numpy_float64(case):
    b, h, w, cin, cout, k, d = case
    x = _random((b, h, w, cin), jnp.float32, 4)
    kernel = _random((k, k, cin, cout), jnp.float32, 5)
    dy = _random((b, h, w, cout), jnp.float32, 6)
    ref = _numpy_weight_grad(np.asarray(x, np.float64), np.asarray(dy, np.float64), k, d)
    _close(dilated.weight_grad(x, dy, k, d), ref.astype(np.float32), 1e-5)
    _, vjp = jax.vjp(lambda kern: dilated.dilated_conv(x, kern, d), kernel)
    (dk,) = vjp(dy)
    np.testing.assert_allclose(np.asarray(dk, np.float64), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    if d >= w:  # off-centre columns read padding only: exactly zero
        assert not np.asarray(dk)[:, [0, k - 1]].any()


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from _equations(getattr(sub, "jaxpr", sub))


def _grad_jaxpr(module, x):
    params = module.init(jax.random.PRNGKey(0), x)["params"]

    def loss(params, x):
        return jnp.sum(jnp.square(module.apply({"params": params}, x).astype(jnp.float32)))
    return list(_equations(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x).jaxpr))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("size,dilation,gemms", [(9, 2, 9), (9, 4, 9), (5, 6, 3), (9, 12, 1)])
def test_gradient_has_no_strided_conv(size, dilation, gemms, dtype):
    x = _random((2, size, size + 2, 8), dtype, 7)  # (5, 7) at d 6: 1 row x 3 columns of taps in bounds
    module = conv(16, 3, dilation=dilation, name="conv", dtype=dtype)
    assert isinstance(module, dilated.DilatedConv) and isinstance(module, nn.Conv)
    eqns = _grad_jaxpr(module, x)
    convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert len(convs) == 2  # forward and input gradient
    assert all(tuple(e.params["window_strides"]) == (1, 1) for e in convs)
    assert all(tuple(e.params["rhs_dilation"]) == (dilation, dilation) for e in convs)
    # weight gradient: one GEMM per tap that reads inside the map, bf16/f32 operands, f32 accumulation
    assert len(dots) == gemms
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [jnp.dtype(dtype)] * 2
        assert e.params["preferred_element_type"] == jnp.float32
    # the path it replaces: plain nn.Conv autodiff writes the weight gradient as a stride-d conv
    plain = nn.Conv(16, (3, 3), padding=((dilation,) * 2,) * 2, kernel_dilation=(dilation, dilation),
                    use_bias=False, dtype=dtype, name="conv")
    strided = [e for e in _grad_jaxpr(plain, x) if e.primitive.name == "conv_general_dilated"
               and tuple(e.params["window_strides"]) == (dilation, dilation)]
    assert len(strided) == 1


def test_conv_dispatch():
    assert type(conv(4, 3, dilation=2, name="c")) is dilated.DilatedConv
    assert type(conv(4, 1, dilation=2, name="c")) is dilated.DilatedConv  # 1x1: one tap, still valid
    for kw in (dict(dilation=1), dict(dilation=2, stride=2), dict(dilation=2, use_bias=True),
               dict(dilation=2, feature_group_count=2)):
        assert type(conv(4, 3, name="c", **kw)) is nn.Conv, kw


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_module_params_and_output_equal_nn_conv(dtype):
    x = _random((2, 7, 6, 5), jnp.float32, 8)
    for d in (2, 3, 8):
        module = conv(4, 3, dilation=d, name="c", dtype=dtype)
        ref = nn.Conv(4, (3, 3), padding=((d, d), (d, d)), kernel_dilation=(d, d), use_bias=False, dtype=dtype,
                      kernel_init=module.kernel_init, name="c")
        v, v_ref = module.init(jax.random.PRNGKey(d), x), ref.init(jax.random.PRNGKey(d), x)
        assert jax.tree.structure(v) == jax.tree.structure(v_ref)
        assert v["params"]["kernel"].dtype == jnp.float32 and v["params"]["kernel"].shape == (3, 3, 5, 4)
        np.testing.assert_array_equal(v["params"]["kernel"], v_ref["params"]["kernel"])
        y, y_ref = module.apply(v, x), ref.apply(v, x)
        assert y.dtype == y_ref.dtype == dtype
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))


def _module_types(model, x):
    """{module path: class name} of every conv the model calls."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
            seen["/".join(context.module.path)] = type(context.module).__name__
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    return seen


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tiny_deeplab_os8_params_outputs_and_grads_equal_nn_conv(monkeypatch, dtype):
    model = DeepLabV3Plus(5, output_stride=8, aspp_rates=(2, 3, 5), dtype=dtype, **TINY)
    x = _random((2, 33, 33, 3), jnp.float32, 9)
    types = _module_types(model, x)
    dilated_paths = sorted(p for p, t in types.items() if t == "DilatedConv")
    assert dilated_paths == sorted(
        ["backbone/layer3_1/conv2", "backbone/layer4_0/conv2", "backbone/layer4_1/conv2", "backbone/layer4_2/conv2",
         "head/b1_0", "head/b2_0", "head/b3_0"])
    # fresh jitted functions for each build (jit caches traces by function identity)
    def init():
        return jax.jit(lambda key, x: model.init(key, x, train=False))(jax.random.PRNGKey(0), x)

    def evaluate(v):
        return jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)

    variables = init()

    def loss(params):
        (logits, _), _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                     mutable=["batch_stats"])
        return jnp.mean(jnp.square(logits.astype(jnp.float32)))

    eval_out = evaluate(variables)
    loss_value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])

    monkeypatch.setattr(layers, "DilatedConv", nn.Conv)  # layers.conv now builds nn.Conv everywhere (the
    # BatchNorms stay fused: layers.kernels('reference') would switch them too)
    assert "DilatedConv" not in _module_types(model, x).values()
    reference = init()
    assert jax.tree.structure(reference) == jax.tree.structure(variables)
    for got, ref in zip(jax.tree.leaves(variables), jax.tree.leaves(reference)):
        assert got.shape == ref.shape and got.dtype == ref.dtype == jnp.float32
        np.testing.assert_array_equal(got, ref)
    for got, ref in zip(jax.tree.leaves(eval_out), jax.tree.leaves(evaluate(variables))):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
    assert float(loss_value) == float(ref_loss)
    # Only the dilated kernels' gradients differ (summation order of the GEMMs vs the conv): every
    # input gradient is the same conv, so all other gradients are bit-identical.
    rtol = 1e-5 if dtype == jnp.float32 else 1e-2
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
    checked = 0
    for path, got in jax.tree_util.tree_leaves_with_path(grads):
        name = "/".join(k.key for k in path[:-1])
        got, ref = np.asarray(got, np.float64), np.asarray(flat_ref[path], np.float64)
        if name in dilated_paths:
            checked += 1
            np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * np.abs(ref).max(), err_msg=name)
        else:
            np.testing.assert_array_equal(got, ref, err_msg=name)
    assert checked == len(dilated_paths)
