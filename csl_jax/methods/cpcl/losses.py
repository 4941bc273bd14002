"""CPCL's loss pieces (docs/methods/cpcl.md §3): disagreement weights, intersection / union pseudo-labels,
confidence weights, the unlabeled losses and the class-weighted OHEM.

The defaults are leofansq/CPCL at HEAD (f0e1800; exp_voc/train.py and exp_city/train.py unchanged
since c1a3cef); the first commit 0bf0c50's statements stay available as named options.
Pure, jit-able functions on one device's share of the batch, float32 whatever the input dtype.
Logits are (B, H, W, C), label maps (B, H, W) int32. Where a statistic is batch-global in the
reference (one process), `axis_name` sums (or maxes) it over the devices inside shard_map.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from csl_jax.constants import IGNORE_INDEX
from csl_jax.methods.parts import losses

#: config.method.confidence: 'pixel' (HEAD), 'first_commit' (0bf0c50), 'reference' (its old name, an alias).
CONFIDENCES = ("pixel", "first_commit", "reference")
#: config.method.unsup_reduction: 'pixel_mean' (HEAD, both datasets), 'valid_mean' (0bf0c50's exp_voc).
REDUCTIONS = ("pixel_mean", "valid_mean")
#: ProbOhemCrossEntropy2d(use_weight=True): the Cityscapes class weights of the CPS/CPCL code.
CITYSCAPES_CLASS_WEIGHTS = (0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539,
                            0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507)


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def pair_confusion(y1: jax.Array, y2: jax.Array, num_classes: int, counted: jax.Array | None = None,
                   axis_name: str | None = None) -> jax.Array:
    """N[a, b] = #{pixels: y1 = a, y2 = b} (summed over devices) + I, (C, C) float32.

    The reference's `sklearn.metrics.confusion_matrix` over the batch with every class appended
    once to both label lists. `counted` (B, H, W) bool limits the pixels (None: all).
    """
    c = num_classes
    flat = (y1.astype(jnp.int32) * c + y2.astype(jnp.int32)).reshape(-1)
    if counted is not None:
        flat = jnp.where(counted.reshape(-1), flat, c * c)
    counts = jnp.bincount(flat, length=c * c + 1)[: c * c].reshape(c, c).astype(jnp.float32)
    return _psum(counts, axis_name) + jnp.eye(c, dtype=jnp.float32)


def disagreement_weights(confusion: jax.Array) -> jax.Array:
    """w_c = (colsum_c - N_cc) / colsum_c + (rowsum_c - N_cc) / rowsum_c, then w / (sum(w) + 1e-6); (C,) float32.

    Large for classes the branches often disagree on. The normalisation is HEAD's (c1a3cef; 0bf0c50
    divided by sum(w)); only comparisons of w are used, which a positive scale does not change.
    """
    diag = jnp.diagonal(confusion)
    col, row = jnp.sum(confusion, axis=0), jnp.sum(confusion, axis=1)
    w = (col - diag) / col + (row - diag) / row
    return w / (jnp.sum(w) + 1e-6)


def pseudo_labels(y1: jax.Array, y2: jax.Array, w: jax.Array) -> dict:
    """Intersection and union labels of two (B, H, W) int32 argmax maps, given w (C,).

    Returns {'agree': y1 == y2, 'pick1': w[y1] > w[y2] (ties: branch 2's label), 'inter': y1 where
    they agree else 255, 'union': y1 where they agree or pick1, else y2}.
    """
    agree = y1 == y2
    pick1 = jnp.take(w, y1) > jnp.take(w, y2)
    return {"agree": agree, "pick1": pick1,
            "inter": jnp.where(agree, y1, IGNORE_INDEX).astype(jnp.int32),
            "union": jnp.where(agree | pick1, y1, y2).astype(jnp.int32)}


def confidence(logits: jax.Array, kind: str, axis_name: str | None = None) -> jax.Array:
    """Confidence of (B, H, W, C) mixed teacher logits, float32, no gradient.

    'pixel' (HEAD since c1a3cef, and the paper): `torch.max(F.softmax(logits, dim=1), dim=1)[0]`, the
      max class probability per pixel, (B, H, W).
    'first_commit' (0bf0c50; 'reference' is its former name, kept for saved configs):
      `torch.max(F.softmax(logits, dim=-1))` on NCHW logits: the softmax runs over the image WIDTH and
      the max over the whole batch (pmax over devices), a scalar () array.
    """
    logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
    if kind == "pixel":
        return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
    if kind in ("first_commit", "reference"):
        peak = jnp.max(jax.nn.softmax(logits, axis=2))
        return peak if axis_name is None else jax.lax.pmax(peak, axis_name)
    raise ValueError(f"config.method.confidence must be one of {CONFIDENCES}, got {kind!r}")


def loss_weights(c1: jax.Array, c2: jax.Array, agree: jax.Array, pick1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(w_inter, w_union), (B, H, W) float32: (c1 + c2) / 2, and where(agree, (c1 + c2) / 2, where(pick1, c1, c2))."""
    mean = (c1 + c2) / 2
    w_inter = jnp.broadcast_to(mean, agree.shape)
    return w_inter, jnp.where(agree, mean, jnp.where(pick1, c1, c2))


def unlabeled_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array, *, reduction: str, group_size: int,
                   axis_name: str | None = None) -> jax.Array:
    """Confidence-weighted CE of a student on pseudo-labels (255 = ignored), float32 scalar.

    'pixel_mean' (HEAD's exp_voc and exp_city, and 0bf0c50's exp_city: CE with reduction='none'):
      mean over ALL pixels of CE_i w_i (ignored pixels contribute 0 and stay in the denominator).
    'valid_mean' (0bf0c50's exp_voc, CE with reduction='mean'): the CE mean over the valid pixels
      of each loss group (`losses.ce_loss`), times the mean of w over all pixels of the batch (over
      devices with `axis_name`).
    Per device, the value's mean over devices is the loss of the whole batch.
    """
    weights = jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32))
    if reduction == "pixel_mean":
        return jnp.mean(losses.pixel_cross_entropy(logits, labels) * weights)
    if reduction == "valid_mean":
        mean_w = jnp.mean(weights) if axis_name is None else jax.lax.pmean(jnp.mean(weights), axis_name)
        return losses.ce_loss(logits, labels, group_size=group_size, axis_name=axis_name) * mean_w
    raise ValueError(f"config.method.unsup_reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _kth_smallest(q: jax.Array, k: int, axis_name: str | None) -> jax.Array:
    """Exact k-th smallest value of each row of q (G, N) float32 in [0, inf], rows summed over devices.

    Bisection on the int32 bit pattern (monotone for non-negative floats): 31 rounds of counting,
    so a row spread over devices needs only psums of (G,) counts, never a gather of the values.
    """
    bits = jax.lax.bitcast_convert_type(q, jnp.int32)
    lo = jnp.zeros(q.shape[:1], jnp.int32)
    hi = jnp.full(q.shape[:1], jax.lax.bitcast_convert_type(jnp.float32(jnp.inf), jnp.int32))

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        count = _psum(jnp.sum(bits <= mid[:, None], axis=1, dtype=jnp.int32), axis_name)
        return jnp.where(count >= k, lo, mid + 1), jnp.where(count >= k, mid, hi)

    _, hi = jax.lax.fori_loop(0, 31, body, (lo, hi))
    return jax.lax.bitcast_convert_type(hi, jnp.float32)


def weighted_ohem_loss(logits: jax.Array, labels: jax.Array, *, class_weights, group_size: int, thresh: float,
                       min_kept: int, num_devices: int = 1, axis_name: str | None = None) -> jax.Array:
    """`ProbOhemCrossEntropy2d(use_weight=True)` per group of images, float32 scalar.

    Per group, q_i = softmax(z_i)[y_i] over the valid pixels: fewer than `min_kept` valid pixels ->
    all valid pixels are kept; otherwise those with q_i <= max(thresh, the min_kept-th smallest q).
    The loss is torch's weighted CE mean over the kept pixels, sum w_y CE / sum w_y, averaged over
    groups. A group is local (`group_size` divides the local batch B) or the whole batch over
    `num_devices` devices (`group_size` = B * num_devices, `axis_name` given: counts and sums are
    psum'd, so the threshold is exact); the value's mean over devices is the loss.

    Args:
      logits: (B, H, W, C); labels: (B, H, W) int, 255 ignored; class_weights: (C,) floats.
    """
    if min_kept < 1:
        raise ValueError(f"config.loss.ohem_min_kept must be >= 1, got {min_kept}")
    batch = logits.shape[0]
    spans = axis_name is not None and group_size == batch * num_devices and num_devices > 1
    if not spans and (group_size < 1 or batch % group_size):
        raise ValueError(f"config.loss.group_size={group_size} must divide the local batch of {batch} images or "
                         f"equal the global batch of {batch * num_devices} (OHEM over the whole batch)")
    cw = jnp.asarray(class_weights, jnp.float32)
    if cw.shape != (logits.shape[-1],):
        raise ValueError(f"OHEM class weights: {cw.shape[0]} values for {logits.shape[-1]} classes")
    valid = labels != IGNORE_INDEX
    ce = losses.pixel_cross_entropy(logits, labels)
    weight = jnp.where(valid, jnp.take(cw, jnp.where(valid, labels, 0)), 0.0)
    rows = 1 if spans else batch // group_size
    ce_g, valid_g, weight_g = (x.reshape(rows, -1) for x in (ce, valid, weight))
    sync = axis_name if spans else None
    q = jnp.where(valid_g, jnp.exp(-jax.lax.stop_gradient(ce_g)), jnp.inf)
    theta = jnp.maximum(thresh, _kth_smallest(q, min_kept, sync))
    enough = _psum(jnp.sum(valid_g, axis=1, dtype=jnp.int32), sync) >= min_kept
    kept = valid_g & (~enough[:, None] | (q <= theta[:, None]))
    numerator = jnp.sum(jnp.where(kept, weight_g * ce_g, 0.0), axis=1)
    denominator = _psum(jnp.sum(jnp.where(kept, weight_g, 0.0), axis=1), sync)
    per_group = numerator / jnp.maximum(denominator, 1e-12)
    return jnp.sum(per_group) * num_devices if spans else jnp.mean(per_group)
