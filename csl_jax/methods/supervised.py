"""Supervised baseline: labeled images only, one train-mode pass that updates BN statistics.

An epoch is one pass over the labeled list, or `config.data.epoch_samples` samples of it when set
(UniMatch V2's `supervised.py`: the list repeated and cut to 3000 / 6000 / 30000 samples).
"""

from __future__ import annotations

from csl_jax.data import StreamSpec
from csl_jax.methods.base import Method, StepContext
from csl_jax.methods.parts import passes


class Supervised(Method):
    """L = L_x on the labeled batch (UniMatch's `supervised.py`)."""

    def streams(self):
        return {"labeled": StreamSpec(source="labeled", batch="labeled", epoch_of="fixed")}

    def loss(self, params, state, batch, ctx: StepContext):
        labeled = batch["labeled"]
        (logits, _), batch_stats = passes.train_pass(
            self.model, params, state["batch_stats"], labeled["image"], rng=ctx.rng,
            sample_ids=ctx.sample_ids("labeled", labeled["image"].shape[0]))
        loss = self.labeled_loss(logits, labeled["label"])
        return loss, (dict(state, batch_stats=batch_stats), {"loss": loss, "loss_x": loss})
