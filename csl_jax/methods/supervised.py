"""Supervised baseline: labeled images only, one train-mode pass that updates BN statistics."""

from __future__ import annotations

from csl_jax.methods.base import Method, StepContext


class Supervised(Method):
    """L = L_x on the labeled batch (UniMatch's `supervised.py`)."""

    def loss(self, params, ctx: StepContext, batch):
        labeled = batch["labeled"]
        logits, state = self.model.apply(
            {"params": params, "batch_stats": ctx.batch_stats}, labeled["image"], train=True, mutable=["batch_stats"]
        )
        loss = self.labeled_loss(logits, labeled["label"])
        return loss, {"batch_stats": state["batch_stats"], "metrics": {"loss": loss, "loss_x": loss}}
