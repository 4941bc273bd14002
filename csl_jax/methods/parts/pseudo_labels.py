"""Pseudo-label selection rules: per-pixel weights for the unlabeled loss.

Every rule maps softmax probabilities ``(B, H, W, C)`` and a validity mask ``(B, H, W)`` (False on
crop padding) to ``(weights, reliable)``: float32 weights in [0, 1] (0 on invalid pixels) and the
bool mask of full-weight valid pixels. The pseudo-label itself is always ``argmax probs``.

- ``csl_weights``: CSL (docs/methods/csl.md §1-5). A per-image spectral 2-way split of the pixels
  in the (confidence, residual variance) plane, computed in closed form in O(HW) with static
  shapes, then Gaussian soft weights around the more confident cluster. ``csl_statistics`` and
  ``reliability_features`` expose the split and the features (diagnostics plots).
- ``threshold_weights``: the fixed confidence threshold of UniMatch/FixMatch.
- ``select``: dispatch by the config's selector name.

All functions are pure, jit-able and run in float32 under ``stop_gradient``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["SELECTORS", "CSLStatistics", "reliability_features", "csl_statistics", "csl_weights", "threshold_weights",
           "select"]

SELECTORS = ("csl", "threshold")


def reliability_features(probs, variance_scaling=False):
    """Per-pixel CSL reliability features (docs/methods/csl.md §1).

    Args:
        probs: (..., C) softmax probabilities (any float dtype; computed in float32).
        variance_scaling: multiply v by (C-1)^2 / (2 (1 - p + 1e-8)) (the authors' later copies).

    Returns:
        (conf, var): (...) float32 each. conf = max_c P_c; var = the residual variance, i.e. the
        variance (divisor C-1) of P with its argmax entry zeroed, around m = (1 - conf)/(C - 1).
    """
    probs = jnp.asarray(probs, jnp.float32)
    num_classes = probs.shape[-1]
    conf = jnp.max(probs, axis=-1)
    is_max = jax.nn.one_hot(jnp.argmax(probs, axis=-1), num_classes, dtype=jnp.bool_)
    rest = jnp.where(is_max, 0.0, probs)
    m = (1.0 - conf) / (num_classes - 1)
    var = jnp.sum(jnp.square(rest - m[..., None]), axis=-1) / (num_classes - 1)
    if variance_scaling:
        # The maximum stops XLA from folding 1 - p + 1e-8 into (1 + 1e-8) - p = 1 - p (inf at p = 1).
        var = var * ((num_classes - 1) ** 2 / (2.0 * (jnp.maximum(1.0 - conf, 0.0) + 1e-8)))
    return conf, var


class CSLStatistics(NamedTuple):
    """Per-image CSL split (docs/methods/csl.md §2-3), batched over B images.

    conf, var: (B, H, W) float32 reliability features.
    assignment: (B, H, W) int32 cluster of each pixel (0 or 1; invalid pixels are 0).
    count: (B, 2) int32 valid pixels per cluster.
    mean: (B, 2, 2) float32 [image, cluster, (conf, var)] cluster means.
    variance: (B, 2, 2) float32 per-dimension unbiased cluster variances.
    reliable: (B,) int32 index of the reliable cluster (higher mean confidence, ties -> 0).
    """
    conf: jax.Array
    var: jax.Array
    assignment: jax.Array
    count: jax.Array
    mean: jax.Array
    variance: jax.Array
    reliable: jax.Array


def _power_of_two_scale(max_v):
    """rho = 2^-floor(log2 max_v), clipped to [2^-126, 2^126]; 1 when max_v = 0 (docs/methods/csl.md §2).

    The exponent is read from the float32 bits, which is exact and needs no denormal support.
    """
    exponent = jax.lax.shift_right_logical(jax.lax.bitcast_convert_type(max_v, jnp.int32), jnp.int32(23)) - 127
    rho = jnp.ldexp(jnp.float32(1.0), jnp.clip(-exponent, -126, 126))
    return jnp.where(max_v > 0, rho, jnp.float32(1.0))


def _spectral_assignment(p, v, valid):
    """Closed-form 2-way spectral split of one image, in scaled units (docs/methods/csl.md §2).

    The closed form is applied to the features written in the orthogonal frame (c, c_perp) of the
    image's mean feature c = (p_mean, v_mean): a_i = x_i . c, b_i = x_i . c_perp. The scores
    s_ik = |V_ik| are invariant under rotations and uniform scalings of X, so the assignments are
    those of §2 exactly, but b_i = p_mean (v_i - v_mean) - v_mean (p_i - p_mean) is computed from
    centred features. This keeps float32 accurate when an image's features form a tight cluster
    (near-uniform or uniformly confident maps, lambda2/lambda1 ~ 1e-10), where det(M) and x . u2
    computed from raw moments lose every digit.

    Args: p, v: (N,) float32 features; valid: (N,) bool. Returns (N,) int32 assignments in {0, 1}.
    """
    rho = _power_of_two_scale(jnp.max(jnp.where(valid, v, 0.0)))
    count = jnp.maximum(jnp.sum(valid), 1)
    p = jnp.where(valid, p, 0.0)
    v_s = jnp.where(valid, v * rho, 0.0)  # suffix _s: scaled units, times rho (v) or rho^2 (v^2)
    p_mean, v_mean_s = jnp.sum(p) / count, jnp.sum(v_s) / count
    # rho^2 overflows to inf for rho > 2^63 (max v < 1e-19): the v^2 terms then vanish, far below
    # float32 resolution of the p^2 terms anyway.
    a = p_mean * p + v_mean_s * v_s / (rho * rho)
    b_s = jnp.where(valid, p_mean * (v_s - v_mean_s) - v_mean_s * (p - p_mean), 0.0)
    # Moments M = [[s_aa, s_ab], [s_ab, s_bb]] and eigenvalues; lam2_s = rho^2 lam2 = det / lam1.
    s_aa, m_ab_s, m_bb_s = jnp.sum(a * a), jnp.sum(a * b_s), jnp.sum(b_s * b_s)
    s_ab, s_bb = m_ab_s / rho, m_bb_s / (rho * rho)
    h = (s_aa - s_bb) / 2
    lam1 = (s_aa + s_bb) / 2 + jnp.sqrt(h * h + s_ab * s_ab)
    lam2_s = jnp.where(lam1 > 0, jnp.maximum(s_aa * m_bb_s - m_ab_s * m_ab_s, 0.0) / lam1, 0.0)
    # Leading eigenvector u1 = (e1, e2) / n, u2 = (-e2, e1) / n; e2_s = rho e2.
    first = s_aa >= s_bb
    e1 = jnp.where(first, lam1 - s_bb, s_ab)
    e2_s = jnp.where(first, m_ab_s, rho * (lam1 - s_aa))
    n = jnp.sqrt(e1 * e1 + jnp.square(e2_s / rho))
    # lam1 = lam2 (M proportional to I): u1 = (1, 0) in the original frame, i.e. (p_mean, -v_mean).
    degenerate = n == 0
    e1 = jnp.where(degenerate, p_mean, e1)
    e2_s = jnp.where(degenerate, -v_mean_s, e2_s)
    n = jnp.where(degenerate, jnp.sqrt(p_mean * p_mean + jnp.square(v_mean_s / rho)), n)
    # Scores s_i0 = |x_i . u1| / sqrt(lam1), s_i1 = |x_i . u2| / sqrt(lam2) (0 when lam2 = 0).
    denom0 = n * jnp.sqrt(lam1)
    denom1 = n * jnp.sqrt(lam2_s)
    s0 = jnp.abs(a * e1 + b_s * e2_s / (rho * rho)) / jnp.where(denom0 > 0, denom0, 1.0)
    s1 = jnp.abs(b_s * e1 - a * e2_s) / jnp.where(denom1 > 0, denom1, jnp.inf)
    return jnp.where(valid & (s1 > s0), 1, 0).astype(jnp.int32)


def _cluster_moments(x, member):
    """Count, mean and unbiased variance of x over the member pixels (0 when empty/singleton).

    Args: x: (N, 2) float32 features; member: (N,) bool. Returns (int32 (), (2,), (2,)).
    The mean gets one correction pass (XLA may divide by multiplying with a rounded reciprocal,
    which turns a cluster of p = 1 pixels into mean 1 - 6e-8 and breaks exact ties), and the
    variance sums squared deviations from it, which keeps float32 accurate for tight clusters.
    """
    count = jnp.sum(member, dtype=jnp.int32)
    mask = member[:, None]
    size = jnp.maximum(count, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(mask, x, 0.0), axis=0) / size
    mean = mean + jnp.sum(jnp.where(mask, x - mean, 0.0), axis=0) / size
    sq_dev = jnp.sum(jnp.where(mask, jnp.square(x - mean), 0.0), axis=0)
    return count, mean, sq_dev / jnp.maximum(count - 1, 1).astype(jnp.float32)


def _image_statistics(conf, var, valid):
    """Split and cluster statistics of one image; inputs (H, W). Returns the CSLStatistics fields."""
    shape = conf.shape
    p, v, valid = conf.reshape(-1), var.reshape(-1), valid.reshape(-1)
    assignment = _spectral_assignment(p, v, valid)
    x = jnp.stack([p, v], axis=-1)
    count, mean, variance = jax.vmap(lambda k: _cluster_moments(x, valid & (assignment == k)))(jnp.arange(2))
    # No valid pixel: cluster 0 takes mu = (1, 0), sigma^2 = (1, 1) (docs/methods/csl.md §5).
    empty = jnp.sum(valid) == 0
    mean = mean.at[0].set(jnp.where(empty, jnp.array([1.0, 0.0]), mean[0]))
    variance = variance.at[0].set(jnp.where(empty, jnp.array([1.0, 1.0]), variance[0]))
    reliable = jnp.where(mean[1, 0] > mean[0, 0], 1, 0).astype(jnp.int32)
    return assignment.reshape(shape), count, mean, variance, reliable


def csl_statistics(probs, valid, variance_scaling=False):
    """Per-image CSL spectral split and cluster statistics (docs/methods/csl.md §1-3, §5).

    Args:
        probs: (B, H, W, C) softmax probabilities (computed in float32, no gradient).
        valid: (B, H, W) bool, False on crop padding (ign = 255).
        variance_scaling: see `reliability_features`.

    Returns:
        A `CSLStatistics` with the features, assignments, per-cluster counts, means, variances and
        the reliable cluster index of every image.
    """
    probs = jax.lax.stop_gradient(jnp.asarray(probs, jnp.float32))
    valid = jnp.asarray(valid, jnp.bool_)
    conf, var = reliability_features(probs, variance_scaling)
    return CSLStatistics(conf, var, *jax.vmap(_image_statistics)(conf, var, valid))


def csl_weights(probs, valid, alpha=8.0, variance_scaling=False, eps=1e-8):
    """CSL soft weights: Gaussian around the reliable cluster with the OR rule (docs/methods/csl.md §4).

    Args:
        probs: (B, H, W, C) softmax probabilities (computed in float32, no gradient).
        valid: (B, H, W) bool, False on crop padding (ign = 255).
        alpha: Gaussian width; w = exp(-z_c^2/alpha) exp(-z_v^2/alpha) below the reliable means.
        variance_scaling: see `reliability_features`.
        eps: added to the cluster variances in the z-scores.

    Returns:
        (weights, reliable): (B, H, W) float32 in [0, 1], 0 where not valid; (B, H, W) bool,
        weight == 1 on a valid pixel.
    """
    stats = csl_statistics(probs, valid, variance_scaling)
    batch = jnp.arange(stats.reliable.shape[0])
    mu = stats.mean[batch, stats.reliable][:, None, None, :]        # (B, 1, 1, 2)
    sigma2 = stats.variance[batch, stats.reliable][:, None, None, :]
    z_c = (stats.conf - mu[..., 0]) / jnp.sqrt(sigma2[..., 0] + eps)
    z_v = (mu[..., 1] - stats.var) / jnp.sqrt(sigma2[..., 1] + eps)
    soft = jnp.exp(-jnp.square(z_c) / alpha) * jnp.exp(-jnp.square(z_v) / alpha)
    weights = jnp.where((z_c > 0) | (z_v > 0), 1.0, soft)
    valid = jnp.asarray(valid, jnp.bool_)
    weights = jnp.where(valid, weights, 0.0)
    return weights, valid & (weights == 1.0)


def threshold_weights(probs, valid, tau):
    """Fixed-threshold selection of UniMatch/FixMatch: w = 1[max_c P_c >= tau] on valid pixels.

    Args:
        probs: (B, H, W, C) softmax probabilities; valid: (B, H, W) bool; tau: float threshold.

    Returns:
        (weights, reliable): (B, H, W) float32 in {0, 1}; (B, H, W) bool, the same mask.
    """
    conf = jnp.max(jax.lax.stop_gradient(jnp.asarray(probs, jnp.float32)), axis=-1)
    reliable = jnp.asarray(valid, jnp.bool_) & (conf >= tau)
    return reliable.astype(jnp.float32), reliable


def select(probs, valid, *, selector, alpha=8.0, variance_scaling=False, eps=1e-8, tau=0.95):
    """Pseudo-label weights by selector name ('csl' or 'threshold'); see the functions above.

    Args:
        probs: (B, H, W, C) softmax probabilities; valid: (B, H, W) bool.
        selector: 'csl' (uses alpha, variance_scaling, eps) or 'threshold' (uses tau).

    Returns:
        (weights, reliable): (B, H, W) float32 and (B, H, W) bool.
    """
    if selector == "csl":
        return csl_weights(probs, valid, alpha=alpha, variance_scaling=variance_scaling, eps=eps)
    if selector == "threshold":
        return threshold_weights(probs, valid, tau)
    raise ValueError(f"Unknown selector {selector!r}; expected one of {', '.join(SELECTORS)}.")
