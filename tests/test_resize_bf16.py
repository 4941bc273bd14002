"""layers.resize_logits: bfloat16 matmuls with float32 accumulation for the final logit resize."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csl_jax.models.layers import interpolation_matrix, resize_align_corners, resize_logits, weights_exact_in


def _logits(shape, seed=0):
    # bfloat16 logits (the classifier's output in bfloat16 training), with a wide spread of exponents
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x *= np.exp2(np.random.default_rng(seed + 1).integers(-6, 7, size=shape)).astype(np.float32)
    return jnp.asarray(x, jnp.bfloat16)


def _dots(jaxpr):
    """Every dot_general equation of a closed jaxpr, sub-jaxprs (custom_vjp, pjit, ...) included."""
    from benchmarks.jaxpr_audit import iter_eqns
    return [e for e, _ in iter_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]


def test_exactness_check():
    assert weights_exact_in(interpolation_matrix(33, 513), jnp.bfloat16)   # k / 16
    assert weights_exact_in(interpolation_matrix(129, 513), jnp.bfloat16)  # k / 4
    assert weights_exact_in(interpolation_matrix(9, 33), jnp.bfloat16)     # the tiny crop 33's c1
    assert not weights_exact_in(interpolation_matrix(33, 512), jnp.bfloat16)
    assert not weights_exact_in(interpolation_matrix(7, 10), jnp.bfloat16)


@pytest.mark.parametrize("in_hw,out_hw", [((33, 33), (513, 513)), ((33, 17), (129, 65)), ((9, 9), (33, 33)),
                                          ((7, 6), (10, 11))])
def test_bf16_resize_equals_float32_resize(in_hw, out_hw):
    x = _logits((2, *in_hw, 5))
    want = resize_align_corners(x.astype(jnp.float32), out_hw)
    got = jax.jit(lambda v: resize_logits(v, out_hw))(x)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    # exact bf16 inputs, exact weights, exact products: only the float32 accumulation order differs
    scale = float(jnp.max(jnp.abs(x.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("in_hw,out_hw", [((9, 9), (33, 33)), ((17, 9), (65, 33)), ((7, 6), (10, 11))])
def test_bf16_resize_gradient_equals_float32_gradient(in_hw, out_hw):
    x = _logits((2, *in_hw, 3), seed=3)
    w = jnp.asarray(np.random.default_rng(4).standard_normal((2, *out_hw, 3)), jnp.float32)

    def grad_of(fn):
        return jax.grad(lambda v: jnp.sum(fn(v) * w))(x)

    want = grad_of(lambda v: resize_align_corners(v.astype(jnp.float32), out_hw))
    got = grad_of(lambda v: resize_logits(v, out_hw))
    assert got.dtype == jnp.bfloat16
    # both round a float32 gradient (equal up to accumulation order) to bfloat16: equal or one bf16 ulp apart
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -7, atol=1e-6)
    assert np.mean(np.asarray(got) == np.asarray(want)) > 0.95


def test_float32_path_unchanged_bit_for_bit():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 9, 4)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(resize_logits(x, (33, 33))),
                                  np.asarray(resize_align_corners(x, (33, 33))))
    xb = _logits((2, 7, 6, 4))  # inexact weights: the float32 resize of the upcast logits
    np.testing.assert_array_equal(np.asarray(resize_logits(xb, (10, 11))),
                                  np.asarray(resize_align_corners(xb.astype(jnp.float32), (10, 11))))
    assert resize_logits(xb, (7, 6)).dtype == jnp.float32


def test_bf16_resize_jaxpr_has_only_bf16_dots():
    x = _logits((2, 9, 9, 3))
    fwd = jax.make_jaxpr(lambda v: resize_logits(v, (33, 33)))(x)
    bwd = jax.make_jaxpr(jax.grad(lambda v: jnp.sum(resize_logits(v, (33, 33)))))(x)
    for jaxpr in (fwd, bwd):
        dots = _dots(jaxpr)
        assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
        assert all(e.outvars[0].aval.dtype == jnp.float32 for e in dots)


def test_deeplab_bf16_forward_has_no_float32_dot():
    """The final logit resize of a bfloat16 DeepLabV3+ (tiny ResNet, crop 33: 9 -> 33) runs bf16 dots."""
    from configs.common import TINY_MODEL
    from csl_jax.models.deeplabv3plus import DeepLabV3Plus

    model = DeepLabV3Plus(num_classes=5, depth=50, output_stride=8, aspp_rates=(12, 24, 36), dtype=jnp.bfloat16,
                          **TINY_MODEL)
    x = jnp.zeros((2, 33, 33, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    jaxpr = jax.make_jaxpr(lambda v, im: model.apply(v, im, train=False))(variables, x)
    dots = _dots(jaxpr)
    assert dots, "the logit resize should be dot_generals"
    f32 = [e for e in dots if any(v.aval.dtype == jnp.float32 for v in e.invars)]
    assert not f32, f"float32-operand dots: {[str(e) for e in f32]}"
    out = jax.eval_shape(lambda v, im: model.apply(v, im, train=False), variables, x)
    assert jax.tree.leaves(out)[0].dtype == jnp.float32
