"""CSS's in-step target maps (docs/methods/css.md "One iteration", steps 1-3): the teacher's logit-space
and representation-space pseudo-labels, carried through the host's step-2 warp, the in-group
CutMix and the flip, together with the strong image.

Targets are a dict of (B, H, W) maps at crop resolution: 'y_cls', 'y_rep' int32 (IGNORE_INDEX
where invalid), 'c_cls', 'c_rep' float32 (0 where invalid), and 'label' int32 (the unlabeled
ground truth for metrics, IGNORE_INDEX where unknown).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from csl_jax.constants import IGNORE_INDEX
from csl_jax.methods.css import losses as css_losses
from csl_jax.methods.parts import views
from csl_jax.models.layers import resize_align_corners

#: value of each target map outside the image (step-2 padding) and on invalid pixels.
FILL = {"y_cls": IGNORE_INDEX, "y_rep": IGNORE_INDEX, "c_cls": 0.0, "c_rep": 0.0, "label": IGNORE_INDEX}


def teacher_targets(pred: jax.Array, rep: jax.Array, prototypes: jax.Array, valid: jax.Array, size,
                    rep_temp: float, quantize: bool) -> dict:
    """Targets of one batch from the teacher's stride-4 outputs (no gradient).

    cls: softmax(up(pred)); rep: softmax(up(cos(rep, P)) / rep_temp); up = align-corners bilinear to
    `size`; labels = argmax (first index on ties), confidences = max. `quantize` stores the
    confidences as floor(255 c) / 255 (the reference's 8-bit PIL round trip).

    Args:
      pred: (B, h, w, C); rep: (B, h, w, D); prototypes: (C, D) (before this step's update);
      valid: (B, H, W) bool, False where the targets are invalid (weak-crop padding).
    Returns:
      {'y_cls', 'c_cls', 'y_rep', 'c_rep'} maps of shape (B, H, W).
    """
    pred, rep, prototypes = jax.lax.stop_gradient((pred, rep, prototypes))
    probs = {"cls": jax.nn.softmax(resize_align_corners(pred, size), axis=-1),
             "rep": jax.nn.softmax(resize_align_corners(css_losses.prototype_similarity(rep, prototypes), size)
                                   / rep_temp, axis=-1)}
    out = {}
    for space, p in probs.items():
        conf = jnp.max(p, axis=-1)
        if quantize:
            conf = jnp.floor(conf * 255.0) / 255.0
        out[f"y_{space}"] = jnp.where(valid, jnp.argmax(p, axis=-1).astype(jnp.int32), IGNORE_INDEX)
        out[f"c_{space}"] = jnp.where(valid, conf, 0.0)
    return out


def warp(maps: dict, warp_index: jax.Array) -> dict:
    """Each (B, H, W) map sampled at `warp_index` (B, H, W) int32 (flat index into the same map,
    -1 = padding, which gets FILL[key])."""
    inside = warp_index >= 0
    flat_index = jnp.where(inside, warp_index, 0).reshape(warp_index.shape[0], -1)

    def one(key, x):
        picked = jnp.take_along_axis(x.reshape(x.shape[0], -1), flat_index, axis=1).reshape(warp_index.shape)
        return jnp.where(inside, picked, jnp.asarray(FILL[key], x.dtype))

    return {k: one(k, v) for k, v in maps.items()}


def partner(x: jax.Array, group_size: int) -> jax.Array:
    """x[(i + 1) mod g] within each group of `group_size` consecutive images of the batch axis."""
    groups = x.reshape((x.shape[0] // group_size, group_size) + x.shape[1:])
    return jnp.roll(groups, -1, axis=1).reshape(x.shape)


def mix_and_flip(image: jax.Array, maps: dict, box: jax.Array, flip: jax.Array, group_size: int):
    """CutMix (inside `box` sample i takes partner (i+1) mod g's pixels), then hflip where `flip`.

    image: (B, H, W, 3); maps: dict of (B, H, W); box: (B, H, W) bool; flip: (B,) bool.
    Returns (image, maps) of the same shapes.
    """
    tree = {"image": image, **maps}
    tree = views.cutmix(box, jax.tree.map(lambda x: partner(x, group_size), tree), tree)

    def flipped(x):
        return jnp.where(flip.reshape((-1,) + (1,) * (x.ndim - 1)), x[:, :, ::-1], x)

    tree = jax.tree.map(flipped, tree)
    image = tree.pop("image")
    return image, tree
