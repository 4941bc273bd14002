"""U2PL's class-wise memory bank as one flat ring buffer with static shapes (docs/methods/u2pl.md "Memory bank").

Class c owns rows [off_c, off_c + cap_c) of `keys` (sum_c cap_c, D). Writing T keys k_0..k_{T-1}
(in order) puts k_j at row off_c + (ptr_c + j) mod cap_c, keeps only the last cap_c of them when
T > cap_c, then ptr_c <- (ptr_c + T) mod cap_c and fill_c <- min(fill_c + T, cap_c). The filled
rows are therefore always the last fill_c keys written, the set U2PL's `dequeue_and_enqueue`
keeps (it concatenates and keeps the tail); sampling is uniform over that set, so the row order
inside it does not matter.

Two write rules (`config.method.queue_write`):
- 'newest' (the reference's `dequeue_and_enqueue`): every candidate key of every group, in global
  group order and pixel order within a group, is appended; the class keeps the newest cap_c
  (`write_candidates`).
- 'random_capped': each loss group proposes at most k_c keys per class (`select_keys`: a uniformly
  random subset of its candidates); the groups of all devices are written in global group order
  (`write`).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from csl_jax.constants import PyTree


def offsets(capacities: Sequence[int]) -> np.ndarray:
    """(C,) int32 first row of each class: the exclusive cumulative sum of the capacities."""
    caps = np.asarray(capacities, np.int64)
    return np.concatenate([[0], np.cumsum(caps)[:-1]]).astype(np.int32)


def init_queue(capacities: Sequence[int], dim: int, dtype=jnp.float32) -> PyTree:
    """Empty bank: {'keys': (sum cap, dim) zeros, 'ptr': (C,) int32 zeros, 'fill': (C,) int32 zeros}."""
    num_classes = len(capacities)
    return {"keys": jnp.zeros((int(sum(capacities)), dim), dtype),
            "ptr": jnp.zeros((num_classes,), jnp.int32), "fill": jnp.zeros((num_classes,), jnp.int32)}


def select_keys(candidates: jax.Array, features: jax.Array, max_keys: int, rng: jax.Array,
                limits: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """A uniformly random subset of each class's candidate features.

    Args:
      candidates: (N, C) bool, pixel n is a key candidate of class c.
      features: (N, D) float32 teacher features (no gradient).
      max_keys: K, the static buffer length (>= every limit; clipped to N).
      limits: (C,) Python ints, at most limits[c] keys of class c.
    Returns:
      (keys (C, K', D), count (C,) int32) with K' = min(K, N): class c's first count[c] rows are
      min(#candidates, limits[c]) distinct candidates in random order; the other rows are junk.
    """
    n = candidates.shape[0]
    k = min(max_keys, n)
    scores = jnp.where(candidates.T, jax.random.uniform(rng, candidates.T.shape), -1.0)
    _, index = jax.lax.top_k(scores, k)  # (C, K'): candidates first, in random order
    count = jnp.minimum(jnp.sum(candidates, axis=0), jnp.asarray(limits, jnp.int32)).astype(jnp.int32)
    return jnp.take(jax.lax.stop_gradient(features), index, axis=0), count


def _ring_rows(queue: PyTree, index: jax.Array, valid: jax.Array, total: jax.Array,
               capacities: Sequence[int]) -> jax.Array:
    """Bank rows of the keys of one write, (..., C) int32.

    index: (..., C) int32, each key's position in this write's class-c sequence; valid: (..., C)
    bool; total: (C,) keys written per class. A valid key among the last cap_c of its class goes to
    row off_c + (ptr_c + index) mod cap_c; every other key gets row sum(cap) (dropped by the scatter).
    """
    caps = jnp.asarray(capacities, jnp.int32)
    keep = valid & (index >= total - caps)
    rows = jnp.asarray(offsets(capacities)) + (queue["ptr"] + index) % caps
    return jnp.where(keep, rows, queue["keys"].shape[0])


def _advanced(queue: PyTree, keys: jax.Array, total: jax.Array, capacities: Sequence[int]) -> PyTree:
    """The bank with rows `keys` after writing total_c keys per class: ptr and fill moved on."""
    caps = jnp.asarray(capacities, jnp.int32)
    return {"keys": keys, "ptr": (queue["ptr"] + total) % caps, "fill": jnp.minimum(queue["fill"] + total, caps)}


def write(queue: PyTree, keys: jax.Array, counts: jax.Array, capacities: Sequence[int]) -> PyTree:
    """Writes the keys of G groups in group order, then slot order (module docstring, 'random_capped').

    Args:
      queue: the bank (`init_queue`).
      keys: (G, C, K, D); counts: (G, C) int32, the valid leading slots of each (group, class).
      capacities: (C,) Python ints.
    Returns:
      the new bank.
    """
    g, c, k, _ = keys.shape
    total = jnp.sum(counts, axis=0)                                   # (C,) keys written per class
    start = jnp.cumsum(counts, axis=0) - counts                       # (G, C) index of each group's slot 0
    index = start[:, None, :] + jnp.arange(k, dtype=jnp.int32)[None, :, None]  # (G, K, C)
    valid = jnp.arange(k)[None, :, None] < counts[:, None, :]
    rows = _ring_rows(queue, index, valid, total, capacities)
    updates = jnp.swapaxes(keys, 1, 2).reshape(g * k * c, -1).astype(queue["keys"].dtype)
    return _advanced(queue, queue["keys"].at[rows.reshape(-1)].set(updates, mode="drop"), total, capacities)


def write_candidates(queue: PyTree, candidates: jax.Array, features: jax.Array, capacities: Sequence[int]) -> PyTree:
    """Writes every candidate key in order, keeping the newest cap_c per class (module docstring, 'newest').

    Args:
      queue: the bank (`init_queue`).
      candidates: (M, C) bool, pixel m is a key of class c; M = the pixels of all groups in global
        group order, pixel order within a group (the order of the reference's gathered keys).
      features: (M, D) teacher features (no gradient).
      capacities: (C,) Python ints.
    Returns:
      the new bank.
    """
    count = candidates.astype(jnp.int32)
    index = jnp.cumsum(count, axis=0) - count                         # (M, C) position among class c's keys
    total = jnp.sum(count, axis=0)
    rows = _ring_rows(queue, index, candidates, total, capacities)
    updates = jax.lax.stop_gradient(features).astype(queue["keys"].dtype)

    def write_class(c, keys):  # one scatter per class: the features are shared, never copied C times
        return keys.at[rows[:, c]].set(updates, mode="drop")

    keys = jax.lax.fori_loop(0, candidates.shape[1], write_class, queue["keys"])
    return _advanced(queue, keys, total, capacities)


def sample(queue: PyTree, cls: jax.Array, num: int, rng: jax.Array, capacities: Sequence[int]) -> jax.Array:
    """`num` keys of class `cls` drawn uniformly with replacement from its filled rows, (num, D).

    An empty class gives row off_c (zeros or stale keys); callers mask its loss out.
    """
    fill = queue["fill"][cls]
    u = jax.random.uniform(rng, (num,))
    index = jnp.minimum(jnp.floor(u * fill.astype(jnp.float32)).astype(jnp.int32), jnp.maximum(fill - 1, 0))
    return jnp.take(queue["keys"], jnp.asarray(offsets(capacities))[cls] + index, axis=0)
