"""In-step view operations shared by the semi-supervised methods: CutMix pasting, its partner, TMP masking.

The data pipeline draws the random parts (CutMix boxes, TMP block masks, photometric jitter) from
(seed, index); what depends on the model's predictions happens here, inside the train step.
Images are in normalised space (ImageNet mean/std), so 0 is the ImageNet-mean colour.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from csl_jax.constants import PyTree


def _broadcast_mask(mask: jax.Array, like: jax.Array) -> jax.Array:
    """(B, H, W) mask reshaped to broadcast against `like` (B, H, W, ...)."""
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def cutmix(box: jax.Array, mixed_in: PyTree, own: PyTree) -> PyTree:
    """CutMix paste: `where(box, mixed_in, own)` for every leaf of matching pytrees.

    Used for images ((B, H, W, 3) float32) and for targets (pseudo-labels (B, H, W) int32, weights
    (B, H, W) float32, ignore maps (B, H, W) int32) alike, so that the strong view and its targets
    always come from the same source.

    Args:
      box: (B, H, W) bool, True inside the CutMix box (all False where the coin said no CutMix).
      mixed_in: pytree of (B, H, W, ...) arrays from the mix batch.
      own: pytree of the same structure from the own (unlabeled) batch.
    Returns:
      pytree of the same structure and dtypes as `own`.
    """
    return jax.tree.map(lambda m, o: jnp.where(_broadcast_mask(box, o), m, o), mixed_in, own)


def trusted_mask(images: jax.Array, reliable: jax.Array, block_mask: jax.Array) -> jax.Array:
    """TMP: zero the pixels that are both reliable and inside a masking block, all channels.

    Args:
      images: (B, H, W, 3) float32 TMP view, normalised (0 = ImageNet-mean colour).
      reliable: (B, H, W) bool, reliable pixels of the same images' weak prediction (w == 1).
      block_mask: (B, H, W) bool, the block mask K (all False for the samples whose TMP coin
        picked the strong branch).
    Returns:
      (B, H, W, 3) array, `where(reliable & block_mask, 0, images)`.
    """
    trusted = _broadcast_mask(reliable & block_mask, images)
    return jnp.where(trusted, jnp.zeros_like(images), images)


def reverse_groups(x: jax.Array, group: int, axis_name: str | None = None, num_devices: int = 1,
                   what: str = "config.method.mix_group") -> jax.Array:
    """The CutMix partner: reverse the batch inside consecutive groups of `group` samples.

    The official code reverses each GPU's batch (`flip(0)`); groups of the reference per-GPU batch
    reproduce that on any device count. Device d holds the global samples d*B .. d*B + B - 1 of
    its local batch x (B, ...). When `group` divides B the reversal is local; when B divides
    `group` (groups spanning devices, inside shard_map over `axis_name` with `num_devices`
    devices) each device receives the reversed block of its mirror device in the group
    (`ppermute`). Same shape out. `what`: the config key of `group`, for the error message.
    """
    b = x.shape[0]
    if group >= 1 and b % group == 0:
        return x.reshape((b // group, group) + x.shape[1:])[:, ::-1].reshape(x.shape)
    span = group // b if b and group % b == 0 else 0
    if axis_name is None or span < 1 or num_devices % span:
        raise ValueError(f"{what} = {group} must divide the local unlabeled batch of {b} images, "
                         f"or be a multiple of it that divides the global batch ({num_devices} devices x {b})")
    perm = [(d, (d // span) * span + span - 1 - d % span) for d in range(num_devices)]
    return jax.lax.ppermute(x[::-1], axis_name, perm)
