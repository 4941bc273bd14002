"""Optimiser: SGD with momentum and torch-style weight decay, poly schedule, backbone/head lr groups."""

from __future__ import annotations

import flax.traverse_util
import jax
import ml_collections
import optax


def poly_schedule(base_lr: float, total_steps: int, power: float = 0.9) -> optax.Schedule:
    """lr_t = base_lr * (1 - t / T)^power; step 0 runs at base_lr (UniMatch's indexing)."""
    return optax.polynomial_schedule(init_value=base_lr, end_value=0.0, power=power, transition_steps=total_steps)


def param_groups(params) -> dict:
    """'backbone' for parameters under the top-level `backbone` module, 'head' for the rest."""
    flat = flax.traverse_util.flatten_dict(params)
    labels = {path: "backbone" if path[0] == "backbone" else "head" for path in flat}
    return flax.traverse_util.unflatten_dict(labels)


def make_optimizer(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """SGD (momentum, optional Nesterov) where g + wd * theta enters the momentum buffer (torch).

    The backbone trains at `lr`, everything else at `lr * lr_multi`, both on the poly schedule.
    """

    def sgd(lr):
        return optax.chain(
            optax.add_decayed_weights(optim_cfg.weight_decay),
            optax.sgd(poly_schedule(lr, total_steps, optim_cfg.poly_power), momentum=optim_cfg.momentum,
                      nesterov=optim_cfg.nesterov),
        )

    return optax.multi_transform(
        {"backbone": sgd(optim_cfg.lr), "head": sgd(optim_cfg.lr * optim_cfg.lr_multi)}, param_groups
    )


def learning_rates(optim_cfg: ml_collections.ConfigDict, total_steps: int, step: jax.Array) -> dict:
    """{'lr': backbone lr, 'lr_head': head lr} at `step`, for logging."""
    lr = poly_schedule(optim_cfg.lr, total_steps, optim_cfg.poly_power)(step)
    return {"lr": lr, "lr_head": lr * optim_cfg.lr_multi}
