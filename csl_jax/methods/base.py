"""What a training method declares: its extra state, its forward passes and BN policy, its losses.

The trainer (`csl_jax/train.py`) owns the loop, the optimiser, sharding and checkpoints. A method is
a small object the per-device train step calls inside `shard_map` (axis name `"data"`):

    loss, aux = method.loss(params, ctx, batch)          # under jax.grad w.r.t. params
    extra     = method.update_extra(ctx.extra, new_params, aux["batch_stats"], ctx.step)

`batch` holds this device's share of each stream: `batch["labeled"]` ({'image', 'label'}), and for
semi-supervised methods `batch["unlabeled"]` and `batch["mix"]` (the views named by
`unlabeled_views`, see `csl_jax/data/pipeline.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from csl_jax import losses, optim

PyTree = Any
AXIS = "data"


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Per-device inputs of one train step besides params and batch.

    Attributes:
      batch_stats: the student's BN running statistics (float32 pytree).
      extra: the method's own state (e.g. {'teacher': variables}); {} when it has none.
      rng: the step key, `fold_in(seed_key, step)`, identical on every device. Per-sample
        randomness (Dropout2d masks) is drawn from it with global sample ids, so results do not
        depend on the device count.
      step: int32 scalar, optimizer steps completed before this one.
      device_index: int32 scalar, this device's position on the "data" axis.
    """

    batch_stats: PyTree
    extra: PyTree
    rng: jax.Array
    step: jax.Array
    device_index: jax.Array


def global_sample_ids(ctx: StepContext, local_batch: int, stream_offset: int = 0) -> jax.Array:
    """(local_batch,) int32 ids of this device's samples in the global batch, plus `stream_offset`.

    Use distinct offsets per stream (e.g. 0 for labeled, global labeled batch for unlabeled) so
    that every sample of a step has its own id.
    """
    return stream_offset + ctx.device_index * local_batch + jnp.arange(local_batch, dtype=jnp.int32)


class Method:
    """Base class; subclasses override `loss` and, when they carry state, the extra-state hooks.

    Args:
      config: the full run config (reads `config.method`, `config.loss`).
      model: the Flax model, built with `bn_axis_name="data"` for use inside shard_map.
      num_classes: number of classes of the dataset.
    """

    #: whether the trainer must feed `batch["unlabeled"]` and `batch["mix"]`.
    uses_unlabeled: bool = False
    #: unlabeled views the data pipeline must produce (besides 'weak' and 'ignore').
    unlabeled_views: tuple[str, ...] = ()

    def __init__(self, config: ml_collections.ConfigDict, model, num_classes: int):
        self.config = config
        self.model = model
        self.num_classes = num_classes

    # -- optimiser -----------------------------------------------------------------------------
    def param_labels(self, params: PyTree) -> PyTree:
        """The optimiser group of every parameter: a pytree of 'backbone' / 'head' like `params`.

        'backbone' trains at `config.optim.lr`, 'head' at `lr * lr_multi` (`optim.make_optimizer`).
        The default labels a leaf 'backbone' when any module on its path is named `backbone`, so
        two-network params (`{'branch1': {'backbone': ...}, 'branch2': {'backbone': ...}}`) work as
        they are. It must look only at paths: optax also calls it on the updates.
        """
        return optim.param_groups(params)

    # -- state ---------------------------------------------------------------------------------
    def init_extra(self, variables: Mapping[str, PyTree]) -> PyTree:
        """The method's extra state at step 0, from the initial student variables."""
        del variables
        return {}

    def update_extra(self, extra: PyTree, params: PyTree, batch_stats: PyTree, step: jax.Array) -> PyTree:
        """Extra state after an optimizer step (`params`, `batch_stats`: the updated student)."""
        del params, batch_stats, step
        return extra

    def eval_variables(self, params: PyTree, batch_stats: PyTree, extra: PyTree) -> dict:
        """Variables of the model that is evaluated and checkpointed as 'best' (student by default)."""
        del extra
        return {"params": params, "batch_stats": batch_stats}

    # -- losses --------------------------------------------------------------------------------
    def loss(self, params: PyTree, ctx: StepContext, batch: Mapping[str, Any]):
        """Per-device loss (scalar float32, normalised per loss group) and aux.

        Returns:
          (loss, aux) with aux = {'batch_stats': the student's running statistics to keep,
          'metrics': dict of float32 scalars (averaged over devices by the trainer)}.
        """
        raise NotImplementedError

    def labeled_loss(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        """L_x: CE with ignore 255 or OHEM (`config.loss.labeled`), per group of images.

        logits: (B, H, W, C) float32; labels: (B, H, W) int32. Returns a float32 scalar.
        """
        cfg = self.config.loss
        if cfg.labeled == "ce":
            return losses.ce_loss(logits, labels, group_size=cfg.group_size)
        if cfg.labeled == "ohem":
            return losses.ohem_loss(
                logits, labels, group_size=cfg.group_size, thresh=cfg.ohem_thresh, min_kept=cfg.ohem_min_kept
            )
        raise ValueError(f"config.loss.labeled must be 'ce' or 'ohem', got {cfg.labeled!r}")
