"""U2PL's entropy partition and unsupervised loss (`compute_unsupervised_loss`, docs/methods/u2pl.md "Losses").

Per loss group of g images (the reference per-GPU batch), at crop resolution:
- H = -sum_k p_k log(p_k + 1e-10) of the train-mode teacher's upsampled softmax;
- a threshold is `masked_percentile` of H over the group's valid pixels (NumPy's default linear
  interpolation);
- L_u = (N_valid / N_kept) * mean_kept CE(z, yhat) = N_valid * sum_kept CE / N_kept^2, with kept =
  valid & H < percentile(H, 100 - q_e); 0 when nothing is kept. Averaged over groups.
All float32, static shapes, no gradient through the thresholds.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from csl_jax.constants import IGNORE_INDEX
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


def unsupervised_loss(logits: jax.Array, pseudo_labels: jax.Array, valid: jax.Array, entropies: jax.Array,
                      percent: jax.Array, *, group_size: int) -> tuple[jax.Array, jax.Array]:
    """U2PL's L_u and the kept mask.

    Args:
      logits: (B, H, W, C) student logits at crop resolution (upsampled).
      pseudo_labels: (B, H, W) int32 argmax of the eval-mode teacher (after CutMix).
      valid: (B, H, W) bool, False on crop padding.
      entropies: (B, H, W) float32 entropy of the train-mode teacher (after CutMix).
      percent: scalar, the drop percentile (`drop_percentile`).
    Returns:
      (loss float32 scalar: mean over groups of N_valid * sum_kept CE / N_kept^2, kept (B, H, W) bool).
    """
    thresholds = jax.lax.stop_gradient(group_percentile(entropies, valid, percent, group_size))
    kept = valid & (entropies < thresholds)
    ce = losses.pixel_cross_entropy(logits, jnp.where(kept, pseudo_labels, IGNORE_INDEX))
    total = jnp.sum(losses._groups(ce, group_size), axis=1)
    n_valid = jnp.sum(losses._groups(valid, group_size), axis=1, dtype=jnp.float32)
    n_kept = jnp.sum(losses._groups(kept, group_size), axis=1, dtype=jnp.float32)
    per_group = jnp.where(n_kept > 0, n_valid * total / jnp.maximum(n_kept, 1.0) ** 2, 0.0)
    return jnp.mean(per_group), kept
