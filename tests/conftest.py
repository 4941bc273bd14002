"""Test setup: 8 fake CPU devices, highest matmul precision, a shared compilation cache."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Tests that train several times (resume, SIGTERM) compile the same programs again; the persistent
# cache turns those recompiles into loads. Shared by the xdist workers of one run.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "CSL_TEST_COMPILATION_CACHE", os.path.join(tempfile.gettempdir(), "csl_jax_test_xla_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
