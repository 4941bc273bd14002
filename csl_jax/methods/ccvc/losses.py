"""CCVC's loss pieces (docs/methods/ccvc.md §4): feature discrepancy, conflict weights, group reversal.

Pure, jit-able functions on one device's batch; float32 whatever the input dtype. Logits are
(B, H, W, C), features (B, h, w, F), masks (B, H, W).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CONFIDENCES = ("logit", "prob")
#: `torch.nn.CosineSimilarity(dim=1, eps=1e-6)` of the official code.
COSINE_EPS = 1e-6


def reverse_groups(x: jax.Array, group: int, axis_name: str | None = None, num_devices: int = 1) -> jax.Array:
    """The CutMix partner: reverse the batch inside consecutive groups of `group` samples.

    The official code reverses each GPU's batch (`flip(0)`); groups of the reference per-GPU batch
    reproduce that on any device count. Device d holds the global samples d*B .. d*B + B - 1 of
    its local batch x (B, ...). When `group` divides B the reversal is local; when B divides
    `group` (groups spanning devices, inside shard_map over `axis_name` with `num_devices`
    devices) each device receives the reversed block of its mirror device in the group
    (`ppermute`). Same shape out.
    """
    b = x.shape[0]
    if group >= 1 and b % group == 0:
        return x.reshape((b // group, group) + x.shape[1:])[:, ::-1].reshape(x.shape)
    span = group // b if b and group % b == 0 else 0
    if axis_name is None or span < 1 or num_devices % span:
        raise ValueError(f"config.method.mix_group = {group} must divide the local unlabeled batch of {b} images, "
                         f"or be a multiple of it that divides the global batch ({num_devices} devices x {b})")
    perm = [(d, (d // span) * span + span - 1 - d % span) for d in range(num_devices)]
    return jax.lax.ppermute(x[::-1], axis_name, perm)


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
