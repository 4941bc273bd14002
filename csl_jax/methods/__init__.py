"""Training methods, chosen by `config.method.name`."""

from __future__ import annotations

from csl_jax.methods.base import Method, StepContext
from csl_jax.methods import semi
from csl_jax.methods.supervised import Supervised


METHODS = {"supervised": Supervised, **semi.METHODS}


def build_method(config, model, num_classes: int) -> Method:
    """The method named by `config.method.name`, e.g. 'supervised', 'csl', 'unimatch', 'fixmatch'."""
    name = config.method.name
    if name not in METHODS:
        raise ValueError(f"config.method.name={name!r} is not a known method; valid: {sorted(METHODS)}")
    return METHODS[name](config, model, num_classes)


__all__ = ["Method", "StepContext", "build_method"]
