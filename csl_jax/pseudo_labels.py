"""Public alias of `csl_jax.methods.parts.pseudo_labels` (the CSL selector), kept for existing imports.

    from csl_jax.pseudo_labels import csl_weights   # same as csl_jax.methods.parts.pseudo_labels
"""

from csl_jax.methods.parts.pseudo_labels import *  # noqa: F401,F403
from csl_jax.methods.parts.pseudo_labels import __all__  # noqa: F401
