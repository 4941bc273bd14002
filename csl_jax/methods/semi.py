"""Former name of `csl_jax.methods.weak_to_strong`, kept so that existing imports keep working."""

from csl_jax.methods.weak_to_strong import *  # noqa: F401,F403
from csl_jax.methods.weak_to_strong import METHODS, WeakToStrong, check_options, default_options  # noqa: F401

SemiSupervised = WeakToStrong
