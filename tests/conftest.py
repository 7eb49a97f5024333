"""Test set-up: eight simulated CPU devices, fast compilation, a shared compilation cache, and the
heaviest test files first.

The tests are compile-bound: most compile a step or a sampler and run it a few times. XLA:CPU's
backend at optimisation level 0 compiles the tiny train steps ~2.5x faster and runs them 2.5-6x
slower, which saves minutes over the suite (benchmarks/RESULTS.md, "Test suite"); skipping LLVM's
expensive passes takes another ~15 % off a compile, and XLA:CPU's older (non-MLIR) fusion
emitters another ~35 % off the tiny train steps' compiles at level 0 (the transformer steps'
~55 %; runs as fast, the stage-2 step ~15 % slower). One LLVM module per program instead of
XLA:CPU's default split into parallel parts: with two test processes on two cores the parts only
compete, and each part pays LLVM's set-up again (the cold suite's CPU time 24.8 -> 20.7 min,
2026-12-03). Results differ from the defaults only by float32 rounding.
``xla_cpu_use_fusion_emitters`` is an escape hatch XLA may retire: if a new jaxlib rejects it as
an unknown flag, drop it here. Subprocesses inherit these flags through
``XLA_FLAGS``. The cache lets tests that build the same train step (a run and its resumption,
say) compile it once per session instead of once per test.
"""

import contextlib
import os
from pathlib import Path

TEST_XLA_FLAGS = {"--xla_force_host_platform_device_count": "8",
                  "--xla_backend_optimization_level": "0",
                  "--xla_llvm_disable_expensive_passes": "true",
                  "--xla_cpu_use_fusion_emitters": "false",
                  "--xla_cpu_parallel_codegen_split_count": "1"}
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_flags] + [f"{name}={value}" for name, value in
                                               TEST_XLA_FLAGS.items() if name not in _flags]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from xla_flags import (  # noqa: E402
    CACHE_MAX_SIZE_BYTES, CACHE_MIN_COMPILE_TIME_SECS, COMPILATION_CACHE_DIR)

# The xdist workers split the CPUs between them (on two cores, a core each), and the subprocesses
# a test starts inherit their worker's share. A worker stepping a program on eight simulated
# devices runs a dozen busy threads; unpinned, they took the CPU from the other worker's
# single-threaded compiles (the tiny stage-2 step's level-3 compile took 35 s in the suite against
# 11 s alone). Pinned, the cold suite took 714 s against 810 s unpinned (2-core AVX2 VM, matmul
# 159-167 GFLOP/s, 2026-12-04). Set before JAX starts its thread pools, which inherit the mask.
_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker is not None and hasattr(os, "sched_setaffinity"):
  _cpus = sorted(os.sched_getaffinity(0))
  _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
  _share = _cpus[int(_worker.removeprefix("gw")) % len(_cpus)::_workers]
  with contextlib.suppress(OSError):  # a container that forbids it: unpinned, only slower
    os.sched_setaffinity(0, set(_share))

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

from vqvdm_jax import config as config_lib  # noqa: E402
from vqvdm_jax import runtime  # noqa: E402

runtime.configure_jax()
# Huge-page malloc (runtime.restart_with_huge_page_malloc) for the xdist workers and the tests'
# subprocesses: xdist starts its workers after this file is loaded, and they inherit it.
_huge_page_malloc = runtime.huge_page_malloc_environment()
if _huge_page_malloc is not None:
  os.environ["GLIBC_TUNABLES"] = _huge_page_malloc["GLIBC_TUNABLES"]
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_TIME_SECS)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_SIZE_BYTES)

# The heaviest files first (seconds of worker time in a cold run of the suite with the workers
# pinned, 2-core CPU, 2026-12-04). `--dist loadfile` runs each file on one worker, and xdist's
# default order (files with the most tests first; pyproject.toml turns it off) left few-test heavy
# files such as the two-process runs and the priors dry run to run alone at the end while the
# other worker idled.
_HEAVIEST_FILES_FIRST = (
    "test_diffusion_training.py",  # ~150 s
    "test_vqgan_training.py",  # ~145 s
    "test_multiprocess.py",  # ~110 s
    "test_benchmarks.py",  # ~95 s
    "test_preemption.py",  # ~85 s
    "test_claims.py",  # ~80 s
    "test_hierarchy.py",  # ~75 s
    "test_recovery.py",  # ~70 s
    "test_token_training.py",  # ~60 s
    "test_evaluate.py",  # ~60 s
    "test_notebooks.py",  # ~50 s
    "test_inference.py",  # ~50 s
    "test_sharding.py",  # ~40 s
    "test_remote_workdir.py",  # ~40 s
    "test_two_level_priors.py",  # ~35 s
    "test_unet3d.py",  # ~28 s
    "test_config.py",  # ~26 s
    "test_vqgan.py",  # ~26 s
)


_unknown = [name for name in _HEAVIEST_FILES_FIRST if not (Path(__file__).parent / name).exists()]
assert not _unknown, f"tests/conftest.py orders test files that do not exist: {_unknown}"


def pytest_collection_modifyitems(items):
  rank = {name: position for position, name in enumerate(_HEAVIEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep order


@pytest.fixture(autouse=True)
def fresh_programs_when_patching(request):
  """Trainers of one config share their compiled programs within a process
  (`config.per_config`). A test that monkeypatches a function those programs trace would
  otherwise run an earlier test's program, or leave its patched one to later tests."""
  patches = "monkeypatch" in request.fixturenames
  if patches:
    config_lib.clear_per_config_caches()
  yield
  if patches:
    config_lib.clear_per_config_caches()
