"""Step plumbing every method shares: network passes with a BN policy, pseudo-label targets and metrics.

Used inside the per-device train step (shard_map over `csl_jax.parallel.AXIS`); every function is
pure and jit-able. A network here is a Flax module returning `(logits, out)` (csl_jax.models) and
its variables are `{'params', 'batch_stats'}`.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from csl_jax.constants import IGNORE_INDEX, PyTree
from csl_jax.methods.parts import pseudo_labels, views


def train_pass(model, params: PyTree, batch_stats: PyTree, images: jax.Array, *, rng: jax.Array,
               sample_ids: jax.Array | None = None, feature_perturb: bool = False) -> tuple[tuple, PyTree]:
    """Train-mode pass (batch statistics, SyncBN): ((logits, out), running statistics after the pass).

    images: (B, H, W, 3); sample_ids: (B,) int32 global ids keying the FP dropout masks. The caller
    decides whether the returned statistics are kept (the BN policy of its method).
    """
    outputs, updated = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                   feature_perturb=feature_perturb, sample_ids=sample_ids, rngs={"dropout": rng},
                                   mutable=["batch_stats"])
    return outputs, updated["batch_stats"]


def eval_pass(model, variables: Mapping[str, PyTree], images: jax.Array) -> jax.Array:
    """Inference-mode logits (running statistics), (B, H, W, C) float32, without gradient."""
    logits, _ = model.apply(jax.lax.stop_gradient(variables), images, train=False)
    return jax.lax.stop_gradient(logits)


def branch_predict(model, name: str):
    """Predict function (variables, images) -> logits of network `name` of a two-network model
    (CCVC, CPCL): `model.<name>` in eval mode on the variables' `name` subtrees of 'params' and
    'batch_stats'."""
    def predict(variables: Mapping[str, PyTree], images: jax.Array) -> jax.Array:
        own = {"params": variables["params"][name], "batch_stats": variables["batch_stats"][name]}
        return getattr(model, name).apply(own, images, train=False)[0]
    return predict


def no_grad_train_pass(model, params: PyTree, batch_stats: PyTree, images: jax.Array, *, rng: jax.Array,
                       sample_ids: jax.Array | None = None) -> jax.Array:
    """Train-mode logits without gradient whose statistics update is discarded, (B, H, W, C) float32."""
    (logits, _), _ = train_pass(model, jax.lax.stop_gradient(params), batch_stats, images, rng=rng,
                                sample_ids=sample_ids)
    return jax.lax.stop_gradient(logits)


def pseudo_targets(logits: jax.Array, ignore: jax.Array, options: Mapping) -> tuple[dict, jax.Array]:
    """Pseudo-label targets of (B, H, W, C) logits: ({'label', 'weight', 'ignore'}, reliable).

    float32 softmax under stop_gradient, the selector named by `options.selector` ('csl' soft
    weights or a 'threshold'; options alpha, variance_scaling, eps, tau), argmax labels.
    label (B, H, W) int32, weight (B, H, W) float32, ignore (B, H, W) int32 (255 on padding),
    reliable (B, H, W) bool (weight == 1 on valid pixels).
    """
    probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
    weight, reliable = pseudo_labels.select(
        probs, ignore != IGNORE_INDEX, selector=options["selector"], alpha=options["alpha"],
        variance_scaling=options["variance_scaling"], eps=options["eps"], tau=options["tau"])
    label = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    return {"label": label, "weight": weight, "ignore": ignore}, reliable


def pseudo_label_metrics(pseudo_label: jax.Array, weight: jax.Array, reliable: jax.Array, ignore: jax.Array,
                         label: jax.Array, axis_name: str | None = None) -> dict:
    """Cheap diagnostics of a batch's pseudo-labels, float32 scalars.

    Args:
      pseudo_label: (B, H, W) int32 argmax of the teacher's probabilities.
      weight: (B, H, W) float32 selector weights; reliable: (B, H, W) bool (weight == 1).
      ignore: (B, H, W) int32, 255 on crop padding.
      label: (B, H, W) int32 ground truth of the unlabeled images, 255 where unknown (all 255 when
        the dataset has none).
      axis_name: when set (inside shard_map), counts are summed over that axis first, so every
        value is the global one, whatever the number of devices.
    Returns:
      mask_ratio (reliable share of valid pixels), mean_weight (over valid pixels), pl_acc,
      pl_acc_reliable, pl_acc_rest (pseudo-label accuracy over valid pixels with a ground truth:
      all, reliable, not reliable; 0 when there is no such pixel), and the counts they are made
      of (n_valid, n_reliable, n_labeled, n_correct, n_labeled_reliable, n_correct_reliable), so
      that sums over steps can be formed.
    """
    valid = ignore != IGNORE_INDEX
    labeled = valid & (label != IGNORE_INDEX)
    correct = labeled & (pseudo_label == label)
    reliable = reliable & valid

    def count(mask):
        return jnp.sum(mask, dtype=jnp.float32)

    def ratio(num, den):
        return jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)

    n = {
        "n_valid": count(valid),
        "n_reliable": count(reliable),
        "n_labeled": count(labeled),
        "n_correct": count(correct),
        "n_labeled_reliable": count(labeled & reliable),
        "n_correct_reliable": count(correct & reliable),
    }
    weight_sum = jnp.sum(jnp.where(valid, weight, 0.0))
    if axis_name is not None:
        n, weight_sum = jax.lax.psum((n, weight_sum), axis_name)
    return dict(
        n,
        mask_ratio=ratio(n["n_reliable"], n["n_valid"]),
        mean_weight=ratio(weight_sum, n["n_valid"]),
        pl_acc=ratio(n["n_correct"], n["n_labeled"]),
        pl_acc_reliable=ratio(n["n_correct_reliable"], n["n_labeled_reliable"]),
        pl_acc_rest=ratio(n["n_correct"] - n["n_correct_reliable"], n["n_labeled"] - n["n_labeled_reliable"]),
    )


def pseudo_label_diagnostics(logits: jax.Array, unlabeled: Mapping[str, jax.Array], options: Mapping) -> dict:
    """What the evaluation loop's pseudo-label plots need, from a model's inference logits on weak views.

    Args:
      logits: (B, H, W, C) inference-mode logits of `unlabeled['weak']`.
      unlabeled: {'weak' (B, H, W, 3) float32, 'ignore' (B, H, W) int32, 'label' (B, H, W) int32 (255
        where unknown); optional 'tmp' (B, H, W, 3), 'block_mask' (B, H, W) bool}.
      options: the selector options of `pseudo_targets` (selector, alpha, variance_scaling, eps, tau).
    Returns:
      dict of arrays: weak (B, H, W, 3); conf, var (B, H, W) float32 CSL reliability features;
      cluster_means (B, 2, 2) float32 [image, cluster, (conf, var)] of the CSL split;
      pseudo_label (B, H, W) int32; weight (B, H, W) float32; reliable, valid, correct (B, H, W)
      bool (correct: pseudo-label equals a known label); and 'tmp' (B, H, W, 3), the TMP view
      after trusted masking, when the input has a TMP view.
    """
    targets, reliable = pseudo_targets(logits, unlabeled["ignore"], options)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    valid = unlabeled["ignore"] != IGNORE_INDEX
    stats = pseudo_labels.csl_statistics(probs, valid, options["variance_scaling"])
    out = {
        "weak": unlabeled["weak"],
        "conf": stats.conf,
        "var": stats.var,
        "cluster_means": stats.mean,
        "pseudo_label": targets["label"],
        "weight": targets["weight"],
        "reliable": reliable,
        "valid": valid,
        "correct": valid & (unlabeled["label"] != IGNORE_INDEX) & (targets["label"] == unlabeled["label"]),
    }
    if "tmp" in unlabeled:
        out["tmp"] = views.trusted_mask(unlabeled["tmp"], reliable, unlabeled["block_mask"])
    return out
