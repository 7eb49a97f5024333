"""Test set-up: eight simulated CPU devices, and a shared compilation cache.

The cache lets tests that build the same train step (a run and its resumption, say) compile it
once per session instead of once per test.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

from vqvdm_jax import runtime  # noqa: E402

runtime.configure_jax()
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), f"vqvdm_jax_test_cache_{os.getuid()}"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
