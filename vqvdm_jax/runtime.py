"""Process-wide JAX settings the project relies on; call once, after distributed start-up."""

from __future__ import annotations

import logging as std_logging
import os

import jax
from absl import logging


class Preempted(Exception):
  """The run received SIGTERM, saved a checkpoint at ``step`` and stopped; rerun to resume."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"Preempted at step {step}: checkpoint saved in {directory}. Rerun the same "
                     f"command with the same --workdir to resume.")
    self.step = step


def _launched_as_a_multi_process_job() -> bool:
  """True on a TPU pod slice or under a multi-task SLURM step (JAX auto-detects both)."""
  tpu_workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in tpu_workers or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts JAX's distributed runtime when the run spans several processes; else does nothing.

  Explicit arguments (GPU clusters without SLURM, local multi-process tests) win; otherwise a
  TPU pod or a SLURM job is detected from the environment. Must run before any other JAX call.
  CPU processes exchange collectives through gloo.
  """
  explicit = coordinator_address is not None or num_processes is not None
  if not explicit and not _launched_as_a_multi_process_job():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    if coordinator_address is None or num_processes is None or process_id is None:
      raise ValueError("--coordinator_address, --num_processes and --process_id go together: "
                       "give all three, or none to auto-detect a TPU pod or SLURM job.")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  logging.info("Process %d of %d; %d local and %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _ProjectInfoOnly(std_logging.Filter):
  """Lets through warnings and errors, the project's own INFO lines, and everything at
  ``--verbosity=1`` or more. Orbax alone logs ~40 INFO lines per checkpoint save."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING or logging.get_verbosity() >= 1
            or record.pathname.startswith(_PACKAGE_DIR))


def quiet_library_logs() -> None:
  """Routes other libraries' INFO logs below the default verbosity (absl's handler)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _ProjectInfoOnly) for f in handler.filters):
    handler.addFilter(_ProjectInfoOnly())


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
