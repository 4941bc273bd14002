"""The train state: what one optimiser step changes (csl_jax.train makes and updates it; the methods and
--mode=eval read it). A leaf module, so that any layer can name it without importing the trainer."""

from __future__ import annotations

from typing import Any

import flax
import jax


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes. All leaves are replicated over the devices.

    step: int32 scalar, optimizer steps done; params: what the optimiser trains (float32 pytree,
    one network or named trees); opt_state: optax state; state: the method's other variables
    (BN statistics, EMA teacher, queues, ...), written by its loss and `after_update`.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    state: Any
