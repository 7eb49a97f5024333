"""Imported first by each two-process worker: 2 CPU devices per process, then the cluster.

The environment must be set before JAX is imported, which is why this is a module of its own
and the workers import it before anything that imports JAX.
"""

import os

from xla_flags import fast_compile_xla_flags

# Compile fast, as in conftest.py (the tests are compile-bound): its flags, with 2 devices.
os.environ["XLA_FLAGS"] = " ".join(["--xla_force_host_platform_device_count=2",
                                    fast_compile_xla_flags()])
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from vqvdm_jax import runtime  # noqa: E402


def join_two_process_cluster(port: str, process_id: str) -> None:
  """This process's place in a 2-process x 2-device cluster coordinated on localhost:port."""
  runtime.initialize_distributed(f"127.0.0.1:{port}", 2, int(process_id))
  runtime.configure_jax()
  assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
