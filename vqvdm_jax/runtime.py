"""Process-wide JAX settings the project relies on; call once, after distributed start-up."""

from __future__ import annotations

import jax


def configure_jax() -> None:
  """Backend-specific JAX settings.

  On CPU, jax 0.10's partitionable threefry makes XLA compile random-number code very slowly:
  measured here, initialising ten 3x3x3 conv kernels compiled in 121-159 s with it and 2.6-4.6 s
  without (2-core EPYC). Parameter initialisation of a small VQGAN drops from minutes to seconds.
  CPU runs are single-host, so the partitionable layout buys nothing there. GPU/TPU keep the
  default, which lets sharded initialisation generate each shard locally.
  """
  if jax.default_backend() == "cpu":
    jax.config.update("jax_threefry_partitionable", False)
