"""Pseudo-label selection rules vs an independent NumPy float64 reference.

The CSL reference follows the original SVD formulation (docs/methods/csl.md §2): X = valid
features (N x 2), SVD of X^T, a_i = argmax_k |V_ik|, per-cluster mean and unbiased variance, the
reliable cluster of higher mean confidence, Gaussian weights with the OR rule.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from csl_jax.methods.parts import pseudo_labels as pl

ALPHA, EPS = 8.0, 1e-8


@functools.partial(jax.jit, static_argnames=("variance_scaling",))
def weights_and_statistics(probs, valid, alpha, variance_scaling):
    return pl.csl_weights(probs, valid, alpha, variance_scaling), pl.csl_statistics(probs, valid, variance_scaling)


# ---------------------------------------------------------------- NumPy float64 reference


def ref_features(probs, variance_scaling=False):
    """conf and (sum_{c != k*} (P_c - m)^2 + m^2) / (C - 1), looping over classes; float64."""
    probs = np.asarray(probs, np.float64)
    num_classes = probs.shape[-1]
    top = np.argmax(probs, axis=-1)
    conf = np.max(probs, axis=-1)
    m = (1.0 - conf) / (num_classes - 1)
    total = m**2
    for c in range(num_classes):
        total = total + np.where(top == c, 0.0, (probs[..., c] - m) ** 2)
    var = total / (num_classes - 1)
    if variance_scaling:
        var = var * (num_classes - 1) ** 2 / (2.0 * (1.0 - conf + 1e-8))
    return conf, var


def ref_image(conf, var, valid, alpha=ALPHA, eps=EPS):
    """One image: (weights (H, W), assignment (H, W), reliable cluster, means (2, 2)); float64."""
    x = np.stack([conf[valid], var[valid]], axis=1).astype(np.float64)
    assign = np.zeros(len(x), np.int64)
    # Exactly collinear rows (one pixel included): rank 1, cluster 0. Products of float32 values
    # are exact in float64, so this test is exact.
    collinear = len(x) == 0 or np.all(x[:, 0] * x[0, 1] == x[:, 1] * x[0, 0])
    if not collinear:
        _, _, vt = np.linalg.svd(x.T, full_matrices=False)
        assign = np.argmax(np.abs(vt.T), axis=1)
    means, variances = np.zeros((2, 2)), np.zeros((2, 2))
    for k in range(2):
        xk = x[assign == k]
        if len(xk):
            means[k] = xk.mean(axis=0)
        if len(xk) > 1:
            variances[k] = xk.var(axis=0, ddof=1)
    if len(x) == 0:
        means[0], variances[0] = (1.0, 0.0), (1.0, 1.0)
    r = int(np.argmax(means[:, 0]))
    z_c = (conf - means[r, 0]) / np.sqrt(variances[r, 0] + eps)
    z_v = (means[r, 1] - var) / np.sqrt(variances[r, 1] + eps)
    w = np.where((z_c > 0) | (z_v > 0), 1.0, np.exp(-z_c**2 / alpha) * np.exp(-z_v**2 / alpha))
    assignment = np.zeros(conf.shape, np.int64)
    assignment[valid] = assign
    return np.where(valid, w, 0.0), assignment, r, means


def check_against_reference(probs, valid, variance_scaling=False, alpha=ALPHA, tol=1e-5):
    """csl_weights/csl_statistics vs the reference built on the same float32 features."""
    probs, valid = jnp.asarray(probs, jnp.float32), jnp.asarray(valid)
    (weights, reliable), stats = weights_and_statistics(probs, valid, alpha, variance_scaling)
    conf, var = np.asarray(stats.conf, np.float64), np.asarray(stats.var, np.float64)
    for b in range(probs.shape[0]):
        w_ref, a_ref, r_ref, mean_ref = ref_image(conf[b], var[b], np.asarray(valid[b]), alpha)
        np.testing.assert_array_equal(np.asarray(stats.assignment[b]), a_ref, err_msg=f"image {b}")
        assert int(stats.reliable[b]) == r_ref, f"image {b}"
        np.testing.assert_allclose(np.asarray(stats.mean[b]), mean_ref, rtol=1e-5, atol=1e-30)
        np.testing.assert_allclose(np.asarray(weights[b]), w_ref, rtol=0, atol=tol, err_msg=f"image {b}")
    w = np.asarray(weights)
    assert w.dtype == np.float32 and w.min() >= 0 and w.max() <= 1
    np.testing.assert_array_equal(np.asarray(reliable), (w == 1) & np.asarray(valid))
    return weights, reliable, stats


# ---------------------------------------------------------------- inputs


def softmax_maps(seed, num_images=6, size=12, num_classes=21, max_margin=50.0):
    """Softmax maps from near-uniform to saturated: per-pixel margins U(0, M), M per image in [0, max]."""
    rng = np.random.default_rng(seed)
    top_margin = np.linspace(0.05, max_margin, num_images)[:, None, None, None]
    margin = rng.uniform(0, 1, (num_images, size, size, 1)) * top_margin
    target = rng.integers(0, num_classes, (num_images, size, size))
    logits = rng.normal(0, 1, (num_images, size, size, num_classes)) + margin * np.eye(num_classes)[target]
    return np.array(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def padded_valid(seed, num_images, size):
    """Crop-padding style masks: random bottom/right padding per image."""
    rng = np.random.default_rng(seed)
    valid = np.ones((num_images, size, size), bool)
    for b in range(num_images):
        valid[b, rng.integers(size // 2, size + 1):, :] = False
        valid[b, :, rng.integers(size // 2, size + 1):] = False
    return valid


# ---------------------------------------------------------------- features


@pytest.mark.parametrize("variance_scaling", [False, True])
def test_reliability_features_match_float64(variance_scaling):
    probs = softmax_maps(0, num_images=3, max_margin=50.0)
    assert (probs.max(-1) == 1.0).any()  # saturated pixels: p = 1 exactly
    probs[0, 0, 0, :3] = (0.4, 0.4, 0.2)  # argmax tie: the first max is zeroed
    probs[0, 0, 0, 3:] = 0.0
    conf_ref, var_ref = ref_features(probs, variance_scaling)
    features = functools.partial(pl.reliability_features, variance_scaling=variance_scaling)
    for conf, var in (features(probs), jax.jit(features)(probs)):
        assert conf.dtype == var.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(conf), conf_ref, rtol=1e-6)
        # Saturated pixels have v < 1e-38 (float32 denormals, few bits); g multiplies them by up to 2e10.
        np.testing.assert_allclose(np.asarray(var), var_ref, rtol=1e-4, atol=1e-26 if variance_scaling else 1e-37)


# ---------------------------------------------------------------- CSL vs the SVD reference


@pytest.mark.parametrize("seed", [0, 1])
def test_csl_matches_svd_reference_on_softmax_maps(seed):
    probs = softmax_maps(seed)
    check_against_reference(probs, padded_valid(seed, probs.shape[0], probs.shape[1]))


def test_csl_matches_svd_reference_on_random_probabilities():
    rng = np.random.default_rng(3)
    raw = rng.uniform(0, 1, (4, 10, 10, 5)) ** 4
    probs = raw / raw.sum(-1, keepdims=True)
    check_against_reference(probs, rng.uniform(size=(4, 10, 10)) < 0.8)


def test_csl_matches_svd_reference_peaked_flat_and_saturated():
    size, num_classes = 10, 7
    rng = np.random.default_rng(4)

    def flat(spread):
        probs = 1.0 / num_classes + rng.uniform(0, spread, (size, size, num_classes))
        return probs / probs.sum(-1, keepdims=True)

    peaked = np.asarray(jax.nn.softmax(8.0 * rng.normal(size=(size, size, num_classes)), axis=-1))
    saturated = np.asarray(jax.nn.softmax(50.0 * np.eye(num_classes)[rng.integers(0, num_classes, (size, size))]
                                          + rng.normal(size=(size, size, num_classes)), axis=-1))
    mixed = np.where(rng.uniform(size=(size, size, 1)) < 0.5, saturated, flat(1e-2))
    probs = np.stack([flat(1e-2), peaked, saturated, mixed])
    assert (probs[2].max(-1) == 1.0).any()  # p = 1 exactly in float32: v far below 1e-19
    valid = np.ones(probs.shape[:3], bool)
    for variance_scaling in (False, True):
        check_against_reference(probs, valid, variance_scaling=variance_scaling)
    # Almost uniform maps: lambda2/lambda1 ~ 5e-10, and the assignments still match. The weights
    # agree to 5e-5 only: sigma_c ~ 1e-4, so one float32 ulp of mu_c (1.5e-8) moves z_c by 1e-4.
    check_against_reference(flat(1e-3)[None], valid[:1], tol=5e-5)


def test_csl_edge_cases():
    size, num_classes = 9, 4
    rng = np.random.default_rng(5)
    probs = np.array(jax.nn.softmax(3.0 * rng.normal(size=(5, size, size, num_classes)), axis=-1))
    valid = np.ones((5, size, size), bool)
    valid[0] = False                 # no valid pixel
    valid[1] = False
    valid[1, 2, 3] = True            # one valid pixel
    probs[2] = probs[2, 0, 0]        # all pixels identical
    # Two distinct points (41 + 40 pixels) with equal confidence land in different clusters: the
    # reliable cluster is 0. Image 4 uses p = 1 exactly, where a mean computed with a rounded
    # reciprocal (1/41) would give 1 - 6e-8 and break the tie.
    for image, (point_a, point_b) in [(3, ((0.5, 0.4, 0.1, 0), (0.5, 0.25, 0.25, 0))),
                                      (4, ((1, 1e-3, 0, 0), (1, 2e-3, 0, 0)))]:
        flat = probs[image].reshape(-1, num_classes)
        flat[:41], flat[41:] = point_a, point_b
    weights, reliable, stats = check_against_reference(probs, valid)
    assert not np.asarray(weights[0]).any() and not np.asarray(reliable[0]).any()
    np.testing.assert_array_equal(np.asarray(stats.mean[0]), [[1, 0], [0, 0]])
    np.testing.assert_array_equal(np.asarray(stats.variance[0]), [[1, 1], [0, 0]])
    # One valid pixel: cluster 0 is the point with variance 0, cluster 1 empty; its weight is 1.
    np.testing.assert_array_equal(np.asarray(stats.count[1]), [1, 0])
    np.testing.assert_array_equal(np.asarray(stats.variance[1]), 0.0)
    assert float(weights[1, 2, 3]) == 1.0 and float(jnp.sum(weights[1])) == 1.0
    # Identical pixels: one cluster, every weight 1.
    np.testing.assert_array_equal(np.asarray(stats.count[2]), [size * size, 0])
    np.testing.assert_array_equal(np.asarray(weights[2]), 1.0)
    # Equal mean confidence in both clusters: the reliable cluster is 0.
    for image in (3, 4):
        assert sorted(np.asarray(stats.count[image]).tolist()) == [40, 41]
        assert stats.mean[image, 0, 0] == stats.mean[image, 1, 0] and int(stats.reliable[image]) == 0


def test_degenerate_eigenvalues_choose_unit_axes():
    """lambda1 = lambda2 (Spv = 0, Spp = Svv): u1 = (1, 0), u2 = (0, 1); ties go to cluster 0."""
    p = jnp.array([1.0, 0.0, 0.5, 0.0, 0.0], jnp.float32)
    v = jnp.array([0.0, 1.0, 0.5, 0.0, 0.0], jnp.float32)
    valid = jnp.array([True, True, False, True, True])
    # M = I: s_i0 = |p_i|, s_i1 = |v_i|; the all-zero pixels tie (0 = 0) and go to cluster 0.
    np.testing.assert_array_equal(np.asarray(pl._spectral_assignment(p, v, valid)), [0, 1, 0, 0, 0])


# ---------------------------------------------------------------- transformations and cost


def test_csl_jit_vmap_and_sharding_agree():
    probs = jnp.asarray(softmax_maps(6, num_images=8, size=8, num_classes=5, max_margin=20.0))
    valid = jnp.asarray(padded_valid(6, 8, 8))
    weights, reliable = pl.csl_weights(probs, valid)
    jit_w, jit_r = jax.jit(pl.csl_weights)(probs, valid)
    np.testing.assert_allclose(np.asarray(jit_w), np.asarray(weights), rtol=0, atol=1e-6)
    single = jax.jit(pl.csl_weights)
    per_image = [single(probs[b:b + 1], valid[b:b + 1])[0] for b in range(8)]
    np.testing.assert_allclose(np.concatenate(per_image), np.asarray(weights), rtol=0, atol=1e-6)

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
        from jax.experimental.shard_map import shard_map
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    spec = PartitionSpec("data")
    sharded = jax.jit(shard_map(pl.csl_weights, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec)))
    sh_w, sh_r = sharded(probs, valid)
    np.testing.assert_allclose(np.asarray(sh_w), np.asarray(weights), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(sh_r), np.asarray(jit_r))


def test_csl_cost_is_linear_no_sort():
    """No sort, top_k or general eigen/SVD solver: the selector is O(HW) per image."""
    forbidden = re.compile(r"\b(sort|top_k|eigh|svd)\[")
    probs, valid = jnp.full((2, 4, 4, 3), 1.0 / 3), jnp.ones((2, 4, 4), bool)
    assert forbidden.search(str(jax.make_jaxpr(jnp.sort)(probs)))  # the pattern does find a sort
    for variance_scaling in (False, True):
        jaxpr = jax.make_jaxpr(functools.partial(pl.csl_weights, variance_scaling=variance_scaling))(probs, valid)
        assert not forbidden.search(str(jaxpr))


# ---------------------------------------------------------------- threshold rule and dispatch


def test_threshold_weights_by_hand():
    probs = jnp.array([[[[0.96, 0.04], [0.95, 0.05]], [[0.5, 0.5], [0.01, 0.99]]]], jnp.float32)
    valid = jnp.array([[[True, True], [True, False]]])
    weights, reliable = pl.threshold_weights(probs, valid, 0.95)
    np.testing.assert_array_equal(np.asarray(weights), [[[1.0, 1.0], [0.0, 0.0]]])
    np.testing.assert_array_equal(np.asarray(reliable), [[[True, True], [False, False]]])
    weights, _ = pl.threshold_weights(probs, valid, 0.0)  # Cityscapes tau = 0: every valid pixel
    np.testing.assert_array_equal(np.asarray(weights), [[[1.0, 1.0], [1.0, 0.0]]])


def test_select_dispatches_and_rejects_unknown_names():
    probs = jnp.asarray(softmax_maps(7, num_images=2, size=4, num_classes=3, max_margin=5.0))
    valid = jnp.ones((2, 4, 4), bool)
    select_csl = jax.jit(functools.partial(pl.select, selector="csl", alpha=2.0, variance_scaling=True))
    want_csl = weights_and_statistics(probs, valid, 2.0, True)[0]
    want_threshold = pl.threshold_weights(probs, valid, 0.6)
    for got, want in [(select_csl(probs, valid), want_csl),
                      (pl.select(probs, valid, selector="threshold", tau=0.6), want_threshold)]:
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    with pytest.raises(ValueError, match="'entropy'.*csl, threshold"):
        pl.select(probs, valid, selector="entropy")
