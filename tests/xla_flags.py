"""The tests' XLA flags and compilation cache for subprocesses, in a module that does not import
JAX: the two-process workers (multiprocess_setup.py) must set ``XLA_FLAGS`` before anything
imports it."""

import os
import tempfile

# conftest.py points the test processes' persistent compilation cache here; subprocesses that
# share it (compilation_cache_environment) load what any test compiled before.
COMPILATION_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"vqvdm_jax_test_cache_{os.getuid()}")
# Programs that compile in at least this many seconds are cached (shorter ones load no faster).
CACHE_MIN_COMPILE_TIME_SECS = 1.0
# A size limit turns on JAX's file lock around cache reads and writes. Without it an entry is
# written in place, unlocked, and another test process can read it half-written while the two
# xdist workers or a test's subprocess compile the same program. Far above the suite's ~0.5 GB.
CACHE_MAX_SIZE_BYTES = 8 * 2**30


def fast_compile_xla_flags() -> str:
  """conftest.py's XLA flags without its 8 simulated devices: for subprocesses that set their
  own device count (or need one)."""
  return " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                  if not flag.startswith("--xla_force_host_platform_device_count"))


def compilation_cache_environment() -> dict[str, str]:
  """Environment variables that give a subprocess the suite's persistent compilation cache."""
  return {"JAX_COMPILATION_CACHE_DIR": COMPILATION_CACHE_DIR,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(CACHE_MIN_COMPILE_TIME_SECS),
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
          "JAX_COMPILATION_CACHE_MAX_SIZE": str(CACHE_MAX_SIZE_BYTES)}
