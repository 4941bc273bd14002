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
# the entropy partition itself is shared (UniMatch V2 runs it as a selector); U2PL keeps its names
from csl_jax.methods.parts.entropy_split import (drop_percentile, entropy, group_percentile,  # noqa: F401
                                                 masked_percentile)


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
