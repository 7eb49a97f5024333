"""Process-wide JAX settings the project relies on; call once, after distributed start-up."""

from __future__ import annotations

import logging as std_logging
import os
import platform
import sys

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


HUGE_PAGE_MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"
KEEP_MALLOC_ENV = "VQVDM_JAX_KEEP_MALLOC"
_TRANSPARENT_HUGE_PAGES = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_malloc_environment(environ: dict[str, str] | None = None) -> dict[str, str] | None:
  """The environment to restart with for huge-page malloc, or None where it does not apply.

  None when it is already set, when ``VQVDM_JAX_KEEP_MALLOC=1``, off Linux, on glibc older than
  2.35 (the first with the tunable) or another libc, and when transparent huge pages are off.
  """
  environ = dict(os.environ if environ is None else environ)
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables or environ.get(KEEP_MALLOC_ENV, "") not in ("", "0"):
    return None
  libc, version = platform.libc_ver()
  if not sys.platform.startswith("linux") or libc != "glibc":
    return None
  try:
    if tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
      return None
  except ValueError:  # an unparseable version: leave malloc alone
    return None
  try:
    with open(_TRANSPARENT_HUGE_PAGES) as modes:
      if "[never]" in modes.read():
        return None
  except OSError:
    return None
  environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, HUGE_PAGE_MALLOC_TUNABLE]))
  return environ


def restart_with_huge_page_malloc() -> None:
  """Re-executes this command once with glibc malloc backing large blocks by huge pages.

  XLA:CPU takes each step's temporary buffers (~120 MB for a demo stage-1 step) from malloc, and
  glibc serves blocks that large with a fresh ``mmap`` that is unmapped again when freed: every
  step faults in ~60,000 zeroed 4 KiB pages. The README's demo took 76 M page faults and 147 s
  of kernel time that way. glibc's ``glibc.malloc.hugetlb=1`` tunable makes malloc ask for
  transparent huge pages (2 MiB) for those blocks: ~8x fewer faults, less kernel time, fewer TLB
  misses in the convolutions (benchmarks/RESULTS.md, sixteenth session). Tunables are read when
  a process starts, so this re-executes the same command line (same PID, same arguments) with
  ``GLIBC_TUNABLES`` extended, before anything else has run. The numbers do not change.
  """
  environment = huge_page_malloc_environment()
  if environment is None or not getattr(sys, "orig_argv", None):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, environment)
  except OSError as error:  # the interpreter cannot be executed again: run as we are
    logging.warning("Could not restart with huge-page malloc (%s); running without it.", error)


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
