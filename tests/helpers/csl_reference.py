"""An independent NumPy float64 reference of the CSL selector, and softmax maps to feed it.

The reference follows the original SVD formulation (docs/methods/csl.md §2): X = valid features
(N x 2), SVD of X^T, a_i = argmax_k |V_ik|, per-cluster mean and unbiased variance, the reliable
cluster of higher mean confidence, Gaussian weights with the OR rule. Used by
tests/test_pseudo_labels.py and benchmarks/csl_numerics.py.
"""

import jax
import jax.numpy as jnp
import numpy as np

ALPHA, EPS = 8.0, 1e-8


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
    # Exactly collinear rows (one pixel included): rank 1, cluster 0. For float32 features the
    # products are exact in float64, so this test is exact.
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


def softmax_maps(seed, num_images=6, size=12, num_classes=21, max_margin=50.0):
    """(num_images, size, size, C) float32 softmax maps from near-uniform to saturated: per-pixel
    margins U(0, M) on a random class, M per image spread over [0.05, max_margin]."""
    rng = np.random.default_rng(seed)
    top_margin = np.linspace(0.05, max_margin, num_images)[:, None, None, None]
    margin = rng.uniform(0, 1, (num_images, size, size, 1)) * top_margin
    target = rng.integers(0, num_classes, (num_images, size, size))
    logits = rng.normal(0, 1, (num_images, size, size, num_classes)) + margin * np.eye(num_classes)[target]
    return np.array(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
