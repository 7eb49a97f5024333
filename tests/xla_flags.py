"""The tests' XLA flags for subprocesses, in a module that does not import JAX: the two-process
workers (multiprocess_setup.py) must set ``XLA_FLAGS`` before anything imports it."""

import os


def fast_compile_xla_flags() -> str:
  """conftest.py's XLA flags without its 8 simulated devices: for subprocesses that set their
  own device count (or need one)."""
  return " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                  if not flag.startswith("--xla_force_host_platform_device_count"))
