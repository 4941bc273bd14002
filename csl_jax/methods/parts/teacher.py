"""EMA teacher: exponential moving average of the student's params and BN running statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from csl_jax.constants import PyTree


def ema_decay(step: jax.Array, momentum: float) -> jax.Array:
    """Warm-up decay d = min(1 - 1/(t + 1), m), float32 scalar.

    Args:
      step: int scalar t, the number of optimizer steps completed before this update (0 at the
        first update, which therefore copies the student).
      momentum: m, the asymptotic decay (0.99 in CSL).
    """
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(1.0 - 1.0 / (t + 1.0), jnp.float32(momentum))


def ema_update(teacher: PyTree, student: PyTree, step: jax.Array, momentum: float) -> PyTree:
    """Teacher after one update: d * teacher + (1 - d) * student, leaf-wise, d = `ema_decay`.

    Args:
      teacher, student: pytrees of float32 arrays with the same structure, e.g.
        {'params': ..., 'batch_stats': ...} (both are averaged).
      step: int scalar, optimizer steps completed before this update.
      momentum: m of `ema_decay`.
    Returns:
      pytree like `teacher`.
    """
    return optax.incremental_update(student, teacher, step_size=1.0 - ema_decay(step, momentum))
