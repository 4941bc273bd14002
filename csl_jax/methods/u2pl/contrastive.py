"""U2PL's contrastive loss with class-wise negative queues (`compute_contra_memobank_loss`, docs/methods/u2pl.md).

Per loss group (g labeled + g unlabeled images), at stride 4, pixels flattened to N = 2 g h w
(labeled first), C classes:
- low(c): labeled valid pixels with y = c, unlabeled valid pixels with yhat = c and H <= gamma_low;
  present = {c : low(c) nonempty};
- anchors(c): `num_queries` student features drawn uniformly with replacement among the low(c)
  pixels where the teacher's P_T[c] > `threshold` (static shapes: u = floor(U count),
  index = searchsorted(cumsum(mask), u, 'right'));
- positive(c): the mean teacher feature over low(c) (`prototypes`);
- negatives(c): `num_negatives` per anchor from the bank of class c (`u2pl_queue.sample`);
- loss_c = mean over anchors of CE(cos(a, [pos, n_1..n_K]) / temperature, 0); 0 without anchor
  candidate or with an empty bank (still counted); L_c = sum_c loss_c / |present|, 0 when
  |present| <= 1.
Class pairing (`pairing`): 'intended' is the above, class c with bank c. 'reference' is the
official second loop (`compute_contra_memobank_loss`, U2PL issue #111): with the present classes
v_0 < ... < v_{P-1}, slot r = 0..P-1 takes anchors(r) and positive(r) of class r but the negatives
(and the emptiness test) of bank v_r; slots r >= P and slots without anchor candidates give 0; the
sum is still divided by P.
Key candidates for the bank (`negative_candidates`): unlabeled valid pixels with H >= gamma_high,
P_T[c] < `negative_threshold` and c at a rank in [low_rank, high_rank) of P_T.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from csl_jax.constants import IGNORE_INDEX, PyTree
from csl_jax.methods.parts.resize import downsample_nearest, nearest_indices  # noqa: F401  (their former home)
from csl_jax.methods.u2pl import queue as u2pl_queue


def one_hot(labels: jax.Array, num_classes: int, reference: bool = False) -> jax.Array:
    """(g, h, w) int labels (255 = none) -> (g, h, w, C) bool one-hot per sample.

    `reference=True` reproduces the official `label_onehot` (scatter along the class axis of a
    (C, g, h, w) tensor with a (g, 1, h, w) index): slot 0 gets the union over the g samples of
    their labels (255 counted as class 0), cleared where sample 0 is 255; slots 1.. stay empty.
    """
    if not reference:
        return jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_) & (labels != IGNORE_INDEX)[..., None]
    union = jnp.any(jax.nn.one_hot(jnp.where(labels == IGNORE_INDEX, 0, labels), num_classes, dtype=jnp.bool_), axis=0)
    first = union & (labels[0] != IGNORE_INDEX)[..., None]
    return jnp.concatenate([first[None], jnp.zeros((labels.shape[0] - 1,) + first.shape, jnp.bool_)])


def rank_mask(probs: jax.Array, low: int, high: int) -> jax.Array:
    """(N, C) probabilities -> (N, C) bool: class c is at rank in [low, high) of the descending order (0 = top)."""
    order = jnp.argsort(-probs, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    return (ranks >= low) & (ranks < high)


def prototypes(features: jax.Array, members: jax.Array) -> jax.Array:
    """(N, D) features, (N, C) bool membership -> (C, D) mean feature per class (0 for an empty class)."""
    weights = members.astype(jnp.float32)
    sums = jnp.einsum("nc,nd->cd", weights, features.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return sums / jnp.maximum(jnp.sum(weights, axis=0), 1.0)[:, None]


def sample_masked(mask: jax.Array, num: int, rng: jax.Array) -> jax.Array:
    """`num` indices drawn uniformly with replacement among the True entries of (N,) `mask`, (num,) int32.

    u = floor(U * count), index = the (u+1)-th True (searchsorted on the cumulative sum); clipped to
    N - 1 when the mask is empty (callers mask that case out).
    """
    cumsum = jnp.cumsum(mask.astype(jnp.int32))
    u = jnp.floor(jax.random.uniform(rng, (num,)) * cumsum[-1].astype(jnp.float32)).astype(jnp.int32)
    u = jnp.minimum(u, jnp.maximum(cumsum[-1] - 1, 0))
    index = jnp.searchsorted(cumsum, u, side="right").astype(jnp.int32)
    return jnp.minimum(index, mask.shape[0] - 1)


def cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """torch.cosine_similarity along the last axis: (a / max(|a|, eps)) . (b / max(|b|, eps)).

    The norm is sqrt(max(|x|^2, eps^2)), whose gradient is 0 (not NaN) at a zero vector, as in torch
    (a feature of ReLU-zero inputs and zero bias is exactly 0).
    """
    def normalise(x):
        return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))

    return jnp.sum(normalise(a) * normalise(b), axis=-1)


def info_nce(anchors: jax.Array, positive: jax.Array, negatives: jax.Array, temperature: float) -> jax.Array:
    """mean over anchors of CE(cos(a, [pos, n_1..n_K]) / T, target 0).

    anchors (Q, D), positive (D,), negatives (Q, K, D); float32 scalar.
    """
    keys = jnp.concatenate([jnp.broadcast_to(positive, (anchors.shape[0], 1, positive.shape[-1])), negatives], axis=1)
    logits = cosine(anchors[:, None, :], keys) / temperature
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])


def negative_candidates(probs: jax.Array, high: jax.Array, *, low_rank: int, high_rank: int,
                        negative_threshold: float, gate: jax.Array | None = None) -> jax.Array:
    """(N, C) bool key candidates of unlabeled pixels: high & P[c] < threshold & rank(c) in [low, high).

    probs: (N, C) teacher probabilities at stride 4; high: (N,) bool high-entropy valid pixels;
    gate: optional (N, C) bool factor (the official one-hot of the pseudo-label, `reference_onehot`).
    """
    mask = high[:, None] & (probs < negative_threshold) & rank_mask(probs, low_rank, high_rank)
    return mask if gate is None else mask & gate


def labeled_negative_candidates(probs: jax.Array, onehot: jax.Array, valid: jax.Array, *, low_rank: int,
                                negative_threshold: float) -> jax.Array:
    """(N, C) bool: the paper's labeled rule, valid pixels with y != c and c among the teacher's top `low_rank`."""
    return (valid[:, None] & ~onehot & (probs < negative_threshold) & rank_mask(probs, 0, low_rank))


def group_loss(rep: jax.Array, rep_teacher: jax.Array, probs: jax.Array, low: jax.Array, queue: PyTree,
               capacities: Sequence[int], rng: jax.Array, *, num_queries: int, num_negatives: int,
               temperature: float, threshold: float, pairing: str = "intended") -> tuple[jax.Array, jax.Array]:
    """L_c of one group (module docstring, `pairing` 'intended' or 'reference') and its number of present classes.

    Args:
      rep: (N, D) student features (with gradient); rep_teacher: (N, D) teacher features;
      probs: (N, C) teacher probabilities; low: (N, C) bool low(c) membership; queue: the bank
      after this step's write; rng: this group's key.
    Returns:
      (float32 scalar L_c, float32 |present|).
    """
    rep_teacher = jax.lax.stop_gradient(rep_teacher)
    num_classes = low.shape[1]
    present = jnp.any(low, axis=0)
    n_present = jnp.sum(present).astype(jnp.float32)
    candidates = low & (probs > threshold)
    protos = prototypes(rep_teacher, low)
    if pairing == "reference":  # slot r < P, negatives from the bank of the r-th present class
        slot_used = jnp.arange(num_classes) < n_present
        bank_of = jnp.argsort(jnp.where(present, 0, 1), stable=True)
    else:
        slot_used, bank_of = present, jnp.arange(num_classes)

    def class_loss(inputs):
        c, key = inputs
        key_a, key_n = jax.random.split(key)
        mask = candidates[:, c]
        anchors = jnp.take(rep, sample_masked(mask, num_queries, key_a), axis=0)
        bank = bank_of[c]
        negatives = u2pl_queue.sample(queue, bank, num_queries * num_negatives, key_n, capacities)
        negatives = jax.lax.stop_gradient(negatives.astype(jnp.float32)).reshape(num_queries, num_negatives, -1)
        loss = info_nce(anchors.astype(jnp.float32), protos[c], negatives, temperature)
        usable = slot_used[c] & jnp.any(mask) & (queue["fill"][bank] > 0)
        return jnp.where(usable, loss, 0.0)

    keys = jax.vmap(lambda c: jax.random.fold_in(rng, c))(jnp.arange(num_classes))
    per_class = jax.lax.map(class_loss, (jnp.arange(num_classes), keys))
    return jnp.where(n_present > 1, jnp.sum(per_class) / jnp.maximum(n_present, 1.0), 0.0), n_present
