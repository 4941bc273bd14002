"""Deprecated: moved to csl_jax.methods.u2pl.unsup; this alias will be removed in a later release.

Importing it warns (DeprecationWarning) and binds this name to that very module object, so both names
share one module (its registrations run once, monkeypatching through either name reaches both).
"""
import importlib
import sys
import warnings

warnings.warn("csl_jax.methods.parts.u2pl_unsup is deprecated: import csl_jax.methods.u2pl.unsup instead; "
              "this alias will be removed in a later release", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("csl_jax.methods.u2pl.unsup")
