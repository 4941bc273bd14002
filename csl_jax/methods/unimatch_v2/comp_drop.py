"""Complementary Dropout of UniMatch V2 (docs/methods/unimatch_v2.md §3), drawn per global sample id.

UniMatch-V2 `model/semseg/dpt.py:141-167` at f6afb4d: for the two strong views S1, S2 of an image,
one Bernoulli(0.5) draw r over the encoder channels gives m1 = 2r and m2 = 2 - m1, so every channel
is kept (x2) in exactly one view; floor(B/2) images of each per-GPU batch, chosen by a random
permutation, are left unperturbed in both views (m1 = m2 = 1). The masks multiply the four tapped
token maps (`feature_scale` of the DPT model).

Here the draws are keyed by global sample ids and groups of the reference per-GPU batch, so the
masks do not depend on the device count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masks(key: jax.Array, sample_ids: jax.Array, positions: jax.Array, channels: int, group: int,
          keep: float = 0.5, scale: float = 2.0) -> tuple[jax.Array, jax.Array]:
    """(m1, m2), each (B, channels) float32, for this device's B unlabeled samples.

    Args:
      key: the step's key for these masks (identical on every device).
      sample_ids: (B,) int32 global sample ids (the channel draw of sample n uses fold_in(key, n)).
      positions: (B,) int32 positions in the global unlabeled batch; sample p is in group p // group.
      channels: D, the encoder width.
      group: the reference per-GPU unlabeled batch (`config.loss.group_size`).
      keep: share of each group left unperturbed: the first floor(group * keep) of a permutation
        of the group drawn from fold_in(key_keep, group index).
      scale: the kept channels' factor (2: m1 = 2r, m2 = 2 - m1).
    """
    key_drop, key_keep = jax.random.split(key)

    def channel_draw(n):
        return jax.random.bernoulli(jax.random.fold_in(key_drop, n), 0.5, (channels,))

    m1 = scale * jax.vmap(channel_draw)(sample_ids).astype(jnp.float32)
    m2 = scale - m1

    def untouched(p):
        order = jax.random.permutation(jax.random.fold_in(key_keep, p // group), group)
        return jnp.any(order[: int(group * keep)] == p % group)

    plain = jax.vmap(untouched)(positions)[:, None]
    return jnp.where(plain, 1.0, m1), jnp.where(plain, 1.0, m2)
