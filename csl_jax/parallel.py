"""Devices: the 1-D ("data",) mesh, shard_map across jax versions, host batches -> global arrays."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named "data" over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def shard_map(fn: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
    """`jax.shard_map` (jax >= 0.7) or the experimental one, with replication checks off."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as experimental_shard_map

    return experimental_shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def varying_axes(x: Any) -> frozenset:
    """The mapped axes `x` varies over inside shard_map with `check_vma` on (empty outside, or off).

    The aval's `vma` (jax < 0.10) or `mat.varying` (jax 0.10); custom_vjp backwards use it to give a
    replicated primal the psummed cotangent autodiff gives it.
    """
    aval = jax.typeof(x)
    if hasattr(aval, "vma"):
        return frozenset(aval.vma)
    return frozenset(getattr(getattr(aval, "mat", None), "varying", frozenset()))


def check_divisible(global_batch: int, key: str, mesh: Mesh, multiple_of: int = 1) -> int:
    """Returns the per-device batch of `global_batch`, or raises naming the config `key`.

    The global batch must divide evenly over the devices and processes, and each device's share
    must be a multiple of `multiple_of` (e.g. the accumulation steps).
    """
    devices, processes = mesh.devices.size, jax.process_count()
    if global_batch <= 0 or global_batch % devices or global_batch % processes:
        raise ValueError(
            f"{key}={global_batch} must be a positive multiple of the number of devices ({devices}) "
            f"and of processes ({processes}); choose e.g. "
            f"{key}={max(devices, processes) * max(1, global_batch // devices)}"
        )
    per_device = global_batch // devices
    if per_device % multiple_of:
        raise ValueError(
            f"{key}={global_batch} gives {per_device} image(s) per device on {devices} device(s), which is not a "
            f"multiple of {multiple_of} (batch.accum_steps); change {key} or batch.accum_steps"
        )
    return per_device


def to_global(tree: Any, mesh: Mesh) -> Any:
    """Per-process numpy batches (leading axis = this process's share) -> global arrays on "data"."""
    sharding = NamedSharding(mesh, P(AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree (params, optimizer state) fully replicated on every device of `mesh`."""
    sharding = NamedSharding(mesh, P())
    return jax.device_put(tree, sharding)
