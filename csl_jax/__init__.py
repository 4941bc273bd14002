"""csl_jax: semi-supervised semantic segmentation in JAX/Flax (CSL, UniMatch/FixMatch, baselines)."""

__version__ = "0.1.0"
