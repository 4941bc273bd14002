"""Training methods, chosen by `config.method.name`."""

from __future__ import annotations

from csl_jax.methods.base import Method, StepContext
from csl_jax.methods import semi
from csl_jax.methods.supervised import Supervised


METHODS = {"supervised": Supervised, **semi.METHODS}


def check_config(config) -> None:
    """Raises ValueError when `config.method` names no method, or options the method cannot run.

    Semi-supervised methods (`semi.check_options`): every option present and valid, and the name
    agreeing with them (`--config.method.name=fixmatch` on a UniMatch config is refused rather than
    trained as UniMatch). main.py calls this before anything is written; `build_method` again.
    """
    name = config.method.name
    if name not in METHODS:
        raise ValueError(f"config.method.name={name!r} is not a known method; valid: {sorted(METHODS)}")
    if name in semi.METHODS:
        semi.check_options(config.method)


def build_method(config, model, num_classes: int) -> Method:
    """The method named by `config.method.name`, e.g. 'supervised', 'csl', 'unimatch', 'fixmatch'."""
    check_config(config)
    return METHODS[config.method.name](config, model, num_classes)


__all__ = ["Method", "StepContext", "build_method", "check_config"]
