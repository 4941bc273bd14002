"""Pseudo-label selection rules vs an independent NumPy float64 reference (tests/helpers/csl_reference.py)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from csl_jax.methods.parts import pseudo_labels as pl
from tests.helpers.csl_reference import ALPHA, ref_features, ref_image, softmax_maps


@functools.partial(jax.jit, static_argnames=("variance_scaling",))
def weights_and_statistics(probs, valid, alpha, variance_scaling):
    return pl.csl_weights(probs, valid, alpha, variance_scaling), pl.csl_statistics(probs, valid, variance_scaling)


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


# ---------------------------------------------------------------- many classes (COCO 81, ADE20K 150)


@pytest.mark.parametrize("variance_scaling", [False, True])
@pytest.mark.parametrize("num_classes", [81, 150])
def test_csl_in_float32_matches_float64_at_coco_and_ade20k_class_counts(num_classes, variance_scaling):
    """The residual variance sums C - 1 terms: at C = 81 / 150 the float32 features stay within 1e-6
    (relative) of float64, the split equals the SVD reference's, and float64 end to end gives the
    same assignments and weights within 1e-6 (benchmarks/csl_numerics.py records the figures)."""
    probs = softmax_maps(7, num_images=4, size=24, num_classes=num_classes)
    valid = padded_valid(7, 4, 24)
    weights, _, stats = check_against_reference(probs, valid, variance_scaling=variance_scaling)
    conf64, var64 = ref_features(probs, variance_scaling)
    np.testing.assert_allclose(np.asarray(stats.conf), conf64, rtol=1e-7)
    big = ref_features(probs)[1] >= 1e-30
    np.testing.assert_allclose(np.asarray(stats.var)[big], var64[big], rtol=1e-6)
    for b in range(probs.shape[0]):
        w64, a64, r64, _ = ref_image(conf64[b], var64[b], valid[b])
        np.testing.assert_array_equal(np.asarray(stats.assignment[b]), a64)
        assert int(stats.reliable[b]) == r64
        np.testing.assert_allclose(np.asarray(weights[b]), w64, rtol=0, atol=1e-6)


def test_csl_numerics_report_has_every_setting():
    from benchmarks import csl_numerics

    rows = csl_numerics.main(["--classes", "81", "--size", "9", "--images", "2"])
    assert [(r["classes"], r["variance_scaling"]) for r in rows] == [(81, False), (81, True)]
    assert all(r["e2e_reliable_diff"] == 0 and r["var_max_rel_err"] < 1e-5 for r in rows)
