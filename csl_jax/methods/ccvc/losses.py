"""CCVC's loss pieces (docs/methods/ccvc.md §4): feature discrepancy, conflict weights, group reversal.

Pure, jit-able functions on one device's batch; float32 whatever the input dtype. Logits are
(B, H, W, C), features (B, h, w, F), masks (B, H, W).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from csl_jax.methods.parts.views import reverse_groups  # noqa: F401  (the CutMix partner, shared with UniMatch V2)

CONFIDENCES = ("logit", "prob")
#: `torch.nn.CosineSimilarity(dim=1, eps=1e-6)` of the official code.
COSINE_EPS = 1e-6


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = COSINE_EPS) -> jax.Array:
    """Channel-wise cosine a.b / (max(|a|, eps) max(|b|, eps)) (torch's formula), (B, h, w) float32."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)

    def norm(x):  # max(|x|, eps) with a finite gradient at x = 0 (an all-zero post-ReLU feature)
        return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1), eps * eps))

    return jnp.sum(a * b, axis=-1) / (norm(a) * norm(b))


def discrepancy(f1: jax.Array, f2: jax.Array) -> jax.Array:
    """d(f1, f2) = ((1 + mean cos(sg f1, f2)) + (1 + mean cos(sg f2, f1))) / 2, float32 scalar.

    The mean runs over the batch and pixels; the first term moves only branch 2, the second only
    branch 1. f1, f2: (B, h, w, F).
    """
    sg = jax.lax.stop_gradient
    return ((1.0 + jnp.mean(cosine_similarity(sg(f1), f2))) + (1.0 + jnp.mean(cosine_similarity(sg(f2), f1)))) / 2


def confidence(logits: jax.Array, kind: str) -> jax.Array:
    """Per-pixel confidence, (B, H, W) float32: 'logit' max raw logit (reference), 'prob' max softmax."""
    logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
    if kind == "logit":
        return jnp.max(logits, axis=-1)
    if kind == "prob":
        return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
    raise ValueError(f"config.method.confidence must be one of {CONFIDENCES}, got {kind!r}")


def conflict_weights(z1: jax.Array, z2: jax.Array, *, tau: float, w_confident: float,
                     kind: str = "logit") -> tuple[jax.Array, jax.Array, jax.Array]:
    """The conflict rule (`vote_threshold_label_selection`): (conflict, w1, w2).

    conflict = argmax z1 != argmax z2 (B, H, W) bool; w_k (B, H, W) float32 = w_confident where
    conflict and confidence_k > tau, else 1 (no pixel is dropped). w_k weights the pseudo-labels of
    branch k (which teach the other branch).
    """
    conflict = jnp.argmax(z1, axis=-1) != jnp.argmax(z2, axis=-1)

    def weight(z):
        return jnp.where(conflict & (confidence(z, kind) > tau), jnp.float32(w_confident), jnp.float32(1.0))

    return conflict, weight(z1), weight(z2)


def hard_labels(logits: jax.Array) -> jax.Array:
    """argmax over classes without gradient, (B, H, W) int32."""
    return jnp.argmax(jax.lax.stop_gradient(logits), axis=-1).astype(jnp.int32)
