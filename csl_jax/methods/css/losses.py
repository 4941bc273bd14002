"""CSS's losses and prototype update (official `generalframeworks/loss/loss.py`: `Attention_Threshold_Loss`,
`Contrast_Loss`, `negative_index_sampler`; `scheduler/rampscheduler.py`). docs/methods/css.md "Losses".

All functions are pure, jit-able and float32; the caller forms the loss groups and the global sums.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from csl_jax.constants import IGNORE_INDEX
from csl_jax.methods.parts import losses

#: F.normalize's epsilon.
NORM_EPS = 1e-12


def normalize(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """x / max(||x||_2, eps) over the last axis (F.normalize); zero vectors stay zero. Written as
    sqrt(max(|x|^2, eps^2)) so that the gradient stays finite at x = 0."""
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


def prototype_similarity(rep: jax.Array, prototypes: jax.Array) -> jax.Array:
    """Cosine similarity of every feature to every prototype: rep (..., D), prototypes (C, D) -> (..., C).

    A zero prototype (a class never updated) has similarity 0 to everything.
    """
    return normalize(rep) @ normalize(prototypes).T


def attention_threshold_loss(logits: jax.Array, labels: jax.Array, conf: jax.Array, threshold: float,
                             group_size: int) -> tuple[jax.Array, jax.Array]:
    """ReCo's `Attention_Threshold_Loss`, per group of images, averaged over groups.

    w_b = #{pixels of image b with conf >= threshold} / #{valid pixels of image b} (0 without valid
    pixels); loss_g = sum over the group's pixels with CE > 0 of w_b CE / #{those pixels} (0 when
    there is none; the reference's mean of an empty set is NaN). Ignored pixels have CE 0.

    Args:
      logits: (B, H, W, C); labels: (B, H, W) int32, IGNORE_INDEX where invalid; conf: (B, H, W)
        float32 (0 where invalid); threshold: the `un_threshold` (0.97); group_size: g dividing B.
    Returns:
      (loss float32 scalar, w (B,) float32).
    """
    ce = losses.pixel_cross_entropy(logits, labels)
    b = labels.shape[0]
    valid = jnp.sum((labels != IGNORE_INDEX).reshape(b, -1), axis=1, dtype=jnp.float32)
    confident = jnp.sum((conf >= threshold).reshape(b, -1), axis=1, dtype=jnp.float32)
    weight = jnp.where(valid > 0, confident / jnp.maximum(valid, 1.0), 0.0)
    kept = (ce > 0).reshape(b // group_size, -1)
    num = jnp.sum((weight[:, None, None] * ce).reshape(b // group_size, -1), axis=1, where=kept)
    count = jnp.sum(kept, axis=1, dtype=jnp.float32)
    return jnp.mean(jnp.where(count > 0, num / jnp.maximum(count, 1.0), 0.0)), weight


def class_sums(rep: jax.Array, classes: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Per-class feature sums and counts: rep (N, D), classes (N,) int32 in [0, C] (C = not valid)
    -> ((C, D) float32 sums, (C,) float32 counts). The caller psums them over devices."""
    onehot = jax.nn.one_hot(classes, num_classes, dtype=jnp.float32)  # class C -> all zeros
    return onehot.T @ rep.astype(jnp.float32), jnp.sum(onehot, axis=0)


def update_prototypes(prototypes: jax.Array, sums: jax.Array, counts: jax.Array, momentum: float) -> jax.Array:
    """`Contrast_Loss`'s prototype rule with global means m_c = sums_c / counts_c, for classes with
    counts_c > 0: P_c <- m_c if the entries of P_c sum to 0, else momentum P_c + (1 - momentum) m_c.
    prototypes, sums: (C, D) float32; counts: (C,). Returns (C, D) float32."""
    mean = sums / jnp.maximum(counts, 1.0)[:, None]
    empty = jnp.sum(prototypes, axis=1, keepdims=True) == 0.0
    new = jnp.where(empty, mean, momentum * prototypes + (1.0 - momentum) * mean)
    return jnp.where((counts > 0)[:, None], new, prototypes)


def _class_order(classes: jax.Array, num_classes: int):
    """(order (N,), starts (C,), counts (C,) int32): pixels sorted by class, class c in
    order[starts[c]: starts[c] + counts[c]]; class C (not valid) last."""
    counts = jnp.bincount(classes, length=num_classes + 1)[:num_classes].astype(jnp.int32)
    order = jnp.argsort(classes, stable=True).astype(jnp.int32)
    return order, jnp.cumsum(counts) - counts, counts


def _uniform_pick(key, shape, order, starts, counts, which):
    """Uniform draws with replacement among the pixels of class `which` (broadcast to `shape`)."""
    n = counts[which]
    u = jnp.minimum(jnp.floor(jax.random.uniform(key, shape) * n).astype(jnp.int32), jnp.maximum(n - 1, 0))
    return order[jnp.clip(starts[which] + u, 0, order.shape[0] - 1)]


def sample_contrast(key: jax.Array, classes: jax.Array, anchor_ok: jax.Array, prototypes: jax.Array,
                    num_classes: int, num_queries: int, num_negatives: int, temperature: float) -> dict:
    """The random draws of `Contrast_Loss` for one group (the reference's one GPU).

    For each class c: `num_queries` anchors uniform with replacement among its candidates
    (`anchor_ok`); for each anchor `num_negatives` negative classes j != c among the present
    classes, from softmax_j(cos(P_c, P_j) / temperature), each then a uniform valid pixel of class j.

    Args:
      key: PRNG key; classes: (N,) int32 in [0, C] (C = not valid); anchor_ok: (N,) bool, valid
        pixels with q_c < strong_threshold; prototypes: (C, D), the updated ones.
    Returns:
      {'anchors': (C, Q) int32, 'negatives': (C, Q, K) int32 pixel indices, 'present': (C,) bool,
       'has_anchor': (C,) bool}. Rows of absent classes are arbitrary valid indices.
    """
    order, starts, counts = _class_order(classes, num_classes)
    a_order, a_starts, a_counts = _class_order(jnp.where(anchor_ok, classes, num_classes), num_classes)
    present = counts > 0
    cos = prototype_similarity(prototypes, prototypes)
    keys = jax.random.split(key, num_classes)

    def per_class(c, k):
        k_anchor, k_class, k_pixel = jax.random.split(k, 3)
        anchors = _uniform_pick(k_anchor, (num_queries,), a_order, a_starts, a_counts, c)
        allowed = present & (jnp.arange(num_classes) != c)
        logits = jnp.where(allowed, cos[c] / temperature, -jnp.inf)
        neg_class = jax.random.categorical(k_class, logits, shape=(num_queries, num_negatives))
        negatives = _uniform_pick(k_pixel, (num_queries, num_negatives), order, starts, counts, neg_class)
        return anchors, negatives

    anchors, negatives = jax.vmap(per_class)(jnp.arange(num_classes), keys)
    return {"anchors": anchors, "negatives": negatives, "present": present, "has_anchor": a_counts > 0}


def contrast_loss(rep: jax.Array, prototypes: jax.Array, draws: dict, temperature: float) -> jax.Array:
    """`Contrast_Loss` of one group from its draws (`sample_contrast`), float32 scalar.

    loss_c = mean over anchors a of CE(cos(r_a, [P_c, r_n1 .. r_nK]) / temperature, target 0) for
    present classes with an anchor; L = sum_c loss_c / #present, 0 when at most one class is present.
    Gradients reach the anchors only (negatives and prototypes are constants, as in the reference).

    Args:
      rep: (N, D) student features of the group (raw); prototypes: (C, D) the updated ones;
      draws: the dict of `sample_contrast`; temperature: 0.5.
    """
    keys_hat = jax.lax.stop_gradient(normalize(rep))
    protos_hat = normalize(jax.lax.stop_gradient(prototypes))

    @jax.checkpoint
    def per_class(args):
        anchors, negatives, proto = args
        a = normalize(rep[anchors])                                                # (Q, D)
        pos = a @ proto                                                            # (Q,)
        neg = jnp.einsum("qd,qkd->qk", a, keys_hat[negatives])                     # (Q, K)
        logits = jnp.concatenate([pos[:, None], neg], axis=1) / temperature
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])

    per = jax.lax.map(per_class, (draws["anchors"], draws["negatives"], protos_hat))
    used = draws["present"] & draws["has_anchor"]
    n_present = jnp.sum(draws["present"], dtype=jnp.float32)
    total = jnp.sum(jnp.where(used, per, 0.0))
    return jnp.where(n_present > 1, total / jnp.maximum(n_present, 1.0), 0.0)


def rampdown(epoch: jax.Array, max_epoch: float = 200.0, mult: float = -5.0) -> jax.Array:
    """`RampdownScheduler` (begin 0, max 1, min 0): exp(mult (e / max_epoch)^2) for e < max_epoch, else 0."""
    e = jnp.asarray(epoch, jnp.float32)
    return jnp.where(e < max_epoch, jnp.exp(mult * jnp.square(e / max_epoch)), 0.0)
