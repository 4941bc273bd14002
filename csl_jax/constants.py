"""Names every part of csl_jax shares: the ignore label and the pytree type alias.

This module imports nothing from csl_jax (and no JAX), so the losses, the data pipeline,
`data_prep` and the plotting code can all import it without pulling in each other. The mesh axis
name lives with the mesh, `csl_jax.parallel.AXIS`.
"""

from typing import Any

#: Label value of pixels that carry no class: object boundaries and void regions of the datasets
#: (written by `data_prep`), crop padding, unknown ground truth. Never counted by losses or mIoU.
IGNORE_INDEX = 255

#: Any nested structure of arrays (params, BN statistics, optimizer state, batches).
PyTree = Any
