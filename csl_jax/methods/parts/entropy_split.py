"""U2PL's entropy partition of pseudo-labels, shared: U2PL's own loss (csl_jax/methods/u2pl/unsup.py)
and UniMatch V2's `u2pl_entropy` selector use it (docs/methods/u2pl.md "Losses").

Per loss group of g images (the reference per-GPU batch), at crop resolution: H = -sum_k p_k
log(p_k + 1e-10) of the teacher's softmax; a pixel is kept when valid and H < the group's
percentile(H, 100 - q_e) over its valid pixels (NumPy's linear interpolation), with q_e annealed
by `drop_percentile`. All float32, static shapes, no gradient through the thresholds.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from csl_jax.methods.parts import losses


def entropy(probs: jax.Array) -> jax.Array:
    """(..., C) probabilities -> (...) float32 natural-log entropy with U2PL's +1e-10 inside the log."""
    probs = jnp.asarray(probs, jnp.float32)
    return -jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)


def masked_percentile(values: jax.Array, mask: jax.Array, percent: jax.Array) -> jax.Array:
    """Per-row percentile of the masked entries, linear interpolation as `np.percentile`.

    Args:
      values: (G, N) float32; mask: (G, N) bool; percent: scalar in [0, 100].
    Returns:
      (G,) float32; +inf for a row without a masked entry (nothing is then >= it).
    """
    values = jnp.asarray(values, jnp.float32)
    ordered = jnp.sort(jnp.where(mask, values, jnp.inf), axis=1)
    count = jnp.sum(mask, axis=1)
    position = jnp.asarray(percent, jnp.float32) / 100.0 * jnp.maximum(count - 1, 0).astype(jnp.float32)
    lo = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, jnp.maximum(count - 1, 0))
    hi = jnp.minimum(lo + 1, jnp.maximum(count - 1, 0))
    frac = position - lo.astype(jnp.float32)
    a = jnp.take_along_axis(ordered, lo[:, None], axis=1)[:, 0]
    b = jnp.take_along_axis(ordered, hi[:, None], axis=1)[:, 0]
    diff = b - a
    # NumPy's _lerp: a + d t below t = 0.5, b - d (1 - t) from it (exact at both ends)
    value = jnp.where(frac >= 0.5, b - diff * (1.0 - frac), a + diff * frac)
    return jnp.where(count > 0, value, jnp.inf)


def group_percentile(entropies: jax.Array, valid: jax.Array, percent: jax.Array, group_size: int) -> jax.Array:
    """Percentile of (B, H, W) entropies over each group's valid pixels, broadcast back to (B, 1, 1)."""
    batch = entropies.shape[0]
    groups = losses._groups(entropies, group_size)
    thresholds = masked_percentile(groups, losses._groups(valid, group_size), percent)
    return jnp.repeat(thresholds, group_size)[:, None, None].reshape(batch, 1, 1)


def drop_percentile(epoch: jax.Array, epochs: float, drop_percent: float) -> jax.Array:
    """The percentile above which entropies are dropped at integer `epoch`: 100 - (100 - drop) (1 - e/E)."""
    return 100.0 - (100.0 - drop_percent) * (1.0 - jnp.asarray(epoch, jnp.float32) / epochs)


def entropy_split_weights(probs: jax.Array, valid: jax.Array, percent: jax.Array,
                          group_size: int) -> tuple[jax.Array, jax.Array]:
    """U2PL's partition as a selection rule: (weights (B, H, W) float32 in {0, 1}, kept (B, H, W) bool).

    probs: (B, H, W, C) teacher softmax; valid: (B, H, W) bool; percent: the `drop_percentile` of the
    epoch. kept = valid & H < the group's percentile(H, percent) over its valid pixels.
    """
    entropies = entropy(jax.lax.stop_gradient(probs))
    thresholds = jax.lax.stop_gradient(group_percentile(entropies, valid, percent, group_size))
    kept = valid & (entropies < thresholds)
    return kept.astype(jnp.float32), kept
