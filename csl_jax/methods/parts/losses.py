"""Segmentation losses: per-pixel CE with ignore, CE, OHEM, weighted unlabeled CE.

All losses are float32 (whatever the logits' dtype) and use static shapes. A scalar loss is
normalised per group of ``group_size`` consecutive images (the reference per-GPU batch) and
averaged over groups:

    loss = mean_g ( sum_{i in g} numerator_i / max(count_g, 1) )

so the value never depends on how many devices the batch is split over. The trainer calls these
on each device's local batch and averages over devices. A group is ``group_size`` consecutive
images of the global batch (device d holds global images d*B .. d*B + B - 1). When ``group_size``
divides the local batch B the groups are local; when it is larger (e.g. CSL's group of 8 on 8
devices of 1 image each), pass ``axis_name``: the per-image valid counts are gathered over the
devices (B floats each), and each device returns its images' share of the group means,

    loss_d = (num_devices / num_groups) * sum_{i on d} numerator_i / max(count_{g(i)}, 1),

whose mean over devices is the loss above (and so are the averaged gradients). Under gradient
accumulation the groups are formed inside each micro-batch. OHEM groups are always local.
"""

import jax
import jax.numpy as jnp

from csl_jax.constants import IGNORE_INDEX


def pixel_cross_entropy(logits, labels, ignore_index=IGNORE_INDEX):
    """Per-pixel softmax cross-entropy, 0 where the label is ``ignore_index``.

    Args:
        logits: (B, H, W, C) any float dtype (computed in float32).
        labels: (B, H, W) int class indices in [0, C) or ``ignore_index``.

    Returns:
        (B, H, W) float32 -log softmax(logits)[label].
    """
    logits = jnp.asarray(logits, jnp.float32)
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)


def _groups(x, group_size):
    """Reshape (B, ...) to (B // group_size, group_size * prod(...)); clear error if B % group_size."""
    batch = x.shape[0]
    if group_size < 1 or batch % group_size:
        raise ValueError(
            f"group_size (config.loss.group_size) = {group_size} must be >= 1 and divide the local "
            f"batch of {batch} images."
        )
    return x.reshape(batch // group_size, -1)


def _grouped_mean(values, counted, group_size, axis_name=None):
    """mean over groups of (sum of values / max(number counted, 1)); values (B, ...) float32.

    Groups larger than the local batch need `axis_name` (the data axis inside shard_map); this
    device's share is returned (module docstring).
    """
    batch = values.shape[0]
    if axis_name is None or (group_size >= 1 and batch % group_size == 0):
        total = jnp.sum(_groups(values, group_size), axis=1)
        count = jnp.sum(_groups(counted, group_size), axis=1, dtype=jnp.float32)
        return jnp.mean(total / jnp.maximum(count, 1.0))
    per_image_count = jnp.sum(counted.reshape(batch, -1), axis=1, dtype=jnp.float32)
    counts = jax.lax.all_gather(per_image_count, axis_name, tiled=True)  # (num_devices * B,)
    global_batch = counts.shape[0]
    if group_size < 1 or global_batch % group_size:
        raise ValueError(f"group_size (config.loss.group_size) = {group_size} must be >= 1 and divide the "
                         f"global batch of {global_batch} images ({global_batch // batch} devices x {batch}).")
    group_counts = jnp.sum(counts.reshape(-1, group_size), axis=1)
    image_group = (jax.lax.axis_index(axis_name) * batch + jnp.arange(batch)) // group_size
    per_image_total = jnp.sum(values.reshape(batch, -1), axis=1)
    share = jnp.sum(per_image_total / jnp.maximum(group_counts[image_group], 1.0))
    return share * (global_batch // batch) / (global_batch // group_size)


def ce_loss(logits, labels, *, group_size, ignore_index=IGNORE_INDEX, axis_name=None):
    """Cross-entropy averaged over the valid pixels of each group of images, then over groups.

    Args:
        logits: (B, H, W, C) float; labels: (B, H, W) int; B a multiple of group_size, or
          `axis_name` for groups over devices (module docstring).

    Returns:
        float32 scalar.
    """
    ce = pixel_cross_entropy(logits, labels, ignore_index)
    return _grouped_mean(ce, labels != ignore_index, group_size, axis_name)


def ohem_loss(logits, labels, *, group_size=2, thresh=0.7, min_kept=200000, ignore_index=IGNORE_INDEX):
    """Online hard example mining CE (UniMatch `ProbOhemCrossEntropy2d`), per group of images.

    Per group, with q_i = softmax(z_i)[y_i] over the valid pixels: fewer than ``min_kept`` valid
    pixels -> CE mean over all valid pixels; otherwise keep the valid pixels with
    q_i <= max(thresh, the min_kept-th smallest q) and take the CE mean over them.

    Args:
        logits: (B, H, W, C) float; labels: (B, H, W) int; B a multiple of group_size.

    Returns:
        float32 scalar.
    """
    if min_kept < 1:
        raise ValueError(f"min_kept (config.loss.ohem_min_kept) must be >= 1, got {min_kept}.")
    ce = pixel_cross_entropy(logits, labels, ignore_index)
    valid = labels != ignore_index
    ce_g, valid_g = _groups(ce, group_size), _groups(valid, group_size)
    q = jnp.where(valid_g, jnp.exp(-jax.lax.stop_gradient(ce_g)), jnp.inf)  # p of the label; invalid last
    kth = jnp.sort(q, axis=1)[:, min(min_kept, q.shape[1]) - 1]
    theta = jnp.maximum(thresh, kth)
    enough = jnp.sum(valid_g, axis=1) >= min_kept
    kept = valid_g & (~enough[:, None] | (q <= theta[:, None]))
    return _grouped_mean(jnp.where(kept, ce_g, 0.0), kept, 1)


def weighted_unlabeled_ce(logits, pseudo_labels, weights, ignore, *, group_size, ignore_index=IGNORE_INDEX,
                          axis_name=None):
    """Weighted CE on pseudo-labels over the valid-pixel count (docs/methods/csl.md §7, UniMatch L_s/L_fp).

    Per group: sum_i w_i CE(z_i, yhat_i) over pixels with ignore != ignore_index, divided by the
    number of such pixels (not by sum w); then averaged over groups.

    Args:
        logits: (B, H, W, C) float; pseudo_labels: (B, H, W) int; weights: (B, H, W) float in [0, 1];
        ignore: (B, H, W) int, ``ignore_index`` on crop padding; B a multiple of group_size, or
          `axis_name` for groups over devices (module docstring).

    Returns:
        float32 scalar.
    """
    valid = ignore != ignore_index
    ce = pixel_cross_entropy(logits, jnp.where(valid, pseudo_labels, ignore_index), ignore_index)
    return _grouped_mean(jnp.asarray(weights, jnp.float32) * ce, valid, group_size, axis_name)
