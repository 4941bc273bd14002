"""Training methods, chosen by `config.method.name`: a registry of `Method` classes.

    supervised       methods/supervised.py      labeled images only
    csl, unimatch,   methods/weak_to_strong.py  weak-to-strong consistency, presets of one step
    fixmatch
    ccvc             methods/ccvc/              CCVC: two branches, feature discrepancy, conflict weights
    u2pl             methods/u2pl/              U2PL: entropy-partitioned pseudo-labels, contrastive queues
    cpcl             methods/cpcl/              CPCL: two networks, intersection / union pseudo-labels
    css              methods/css/               CSS: cross-space pseudo-labels, prototypes, tilted contrast
    unimatch_v2,     methods/unimatch_v2/       UniMatch V2 on DINOv2 + DPT: EMA teacher, two strong views with
    fixmatch_v2                                 Complementary Dropout (CSL's selector: variant 'csl')
    methods/parts/   what several methods share: losses, pseudo-label selection, passes, views, EMA
                     teacher, legacy-nearest downsampling

A method folder holds the method (`__init__.py`: the `Method` subclass, `default_options`,
`configure`, `check_options`, ...) and its own pieces beside it (losses.py, data.py, ...); a method
folder imports from parts/ and csl_jax/data, never from another method's folder. A new method is one
file (or folder) defining a `Method` subclass, registered here with `register_method`.
"""

from __future__ import annotations

from typing import Callable

from csl_jax.methods import weak_to_strong
from csl_jax.methods.base import Method, PredictFn, StepContext
from csl_jax.methods.supervised import Supervised

#: method name -> Method subclass (called as cls(config, num_classes)).
METHODS: dict[str, type[Method]] = {"supervised": Supervised, **weak_to_strong.METHODS}
#: method name -> check of `config.method` raising ValueError (for methods with options).
_OPTION_CHECKS: dict[str, Callable] = {name: weak_to_strong.check_options for name in weak_to_strong.METHODS}


def register_method(name: str, cls: type[Method], check_options: Callable | None = None) -> None:
    """Adds method `name` (refused if taken); `check_options(config.method)` raises on bad options."""
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered ({METHODS[name].__name__})")
    METHODS[name] = cls
    if check_options is not None:
        _OPTION_CHECKS[name] = check_options


def check_config(config) -> None:
    """Raises ValueError when `config.method` names no method, or options the method cannot run.

    Weak-to-strong methods (`weak_to_strong.check_options`): every option present and valid, and
    the name agreeing with them (`--config.method.name=fixmatch` on a UniMatch config is refused
    rather than trained as UniMatch). main.py calls this before anything is written; `build_method`
    again.
    """
    name = config.method.name
    if name not in METHODS:
        raise ValueError(f"config.method.name={name!r} is not a known method; valid: {sorted(METHODS)}")
    if name in _OPTION_CHECKS:
        _OPTION_CHECKS[name](config.method)


def build_method(config, num_classes: int) -> Method:
    """The method named by `config.method.name`, e.g. 'supervised', 'csl', 'unimatch', 'fixmatch'."""
    check_config(config)
    return METHODS[config.method.name](config, num_classes)


from csl_jax.methods import ccvc as _ccvc  # noqa: E402

register_method("ccvc", _ccvc.CCVC, _ccvc.check_options)

from csl_jax.methods import u2pl as _u2pl  # noqa: E402

register_method(_u2pl.NAME, _u2pl.U2PL, _u2pl.check_options)

from csl_jax.methods import css as _css  # noqa: E402

register_method(_css.NAME, _css.CSS, _css.check_options)

from csl_jax.methods import cpcl as _cpcl  # noqa: E402

register_method(_cpcl.NAME, _cpcl.CPCL, _cpcl.check_options)

from csl_jax.methods import unimatch_v2 as _unimatch_v2  # noqa: E402

for _name in _unimatch_v2.PRESETS:
    register_method(_name, _unimatch_v2.UniMatchV2, _unimatch_v2.check_options)

__all__ = ["METHODS", "Method", "PredictFn", "StepContext", "build_method", "check_config", "register_method"]
