"""Huge-page malloc: the entry point restarts itself once with glibc's hugetlb tunable, and glibc
then marks XLA-sized blocks for transparent huge pages."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vqvdm_jax import runtime

REPO = Path(__file__).resolve().parents[1]

needs_huge_pages = pytest.mark.skipif(
    runtime.huge_page_malloc_environment({}) is None,
    reason="no glibc >= 2.35 with transparent huge pages on this machine")

# Allocates a block as large as a demo step's XLA buffers and prints the kernel's flags for the
# mapping it lies in: "hg" is MADV_HUGEPAGE, set by malloc itself only under the tunable.
_BLOCK_FLAGS = textwrap.dedent("""
    import ctypes
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    block = libc.malloc(48 << 20)
    inside = False
    for line in open("/proc/self/smaps"):
      first = line.split()[0]
      if "-" in first and not first.endswith(":"):
        start, end = (int(bound, 16) for bound in first.split("-"))
        inside = start <= block < end
      elif inside and line.startswith("VmFlags:"):
        print(line.split()[1:])
""")


def _clean_environment(**extra: str) -> dict[str, str]:
  environment = {name: value for name, value in os.environ.items()
                 if name not in ("GLIBC_TUNABLES", runtime.KEEP_MALLOC_ENV)}
  return {**environment, **extra}


def test_environment_adds_the_tunable_once_and_keeps_others(monkeypatch, tmp_path):
  modes = tmp_path / "enabled"
  modes.write_text("always [madvise] never\n")
  monkeypatch.setattr(runtime, "_TRANSPARENT_HUGE_PAGES", str(modes))
  monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
  monkeypatch.setattr(runtime.sys, "platform", "linux")
  added = runtime.huge_page_malloc_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
                                                "HOME": "/h"})
  assert added == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
                   "HOME": "/h"}
  assert runtime.huge_page_malloc_environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert runtime.huge_page_malloc_environment(added) is None  # never a second restart
  assert runtime.huge_page_malloc_environment({runtime.KEEP_MALLOC_ENV: "1"}) is None
  assert runtime.huge_page_malloc_environment({runtime.KEEP_MALLOC_ENV: "0"}) is not None
  modes.write_text("always madvise [never]\n")
  assert runtime.huge_page_malloc_environment({}) is None
  modes.unlink()
  assert runtime.huge_page_malloc_environment({}) is None
  modes.write_text("[always] madvise never\n")
  assert runtime.huge_page_malloc_environment({}) is not None
  monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.34"))
  assert runtime.huge_page_malloc_environment({}) is None
  monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))
  assert runtime.huge_page_malloc_environment({}) is None
  monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
  monkeypatch.setattr(runtime.sys, "platform", "darwin")
  assert runtime.huge_page_malloc_environment({}) is None


@needs_huge_pages
def test_glibc_marks_large_blocks_for_huge_pages_only_under_the_tunable():
  def flags(environment):
    result = subprocess.run([sys.executable, "-c", _BLOCK_FLAGS], env=environment,
                            capture_output=True, text=True, check=True)
    return result.stdout

  assert "'hg'" not in flags(_clean_environment())
  assert "'hg'" in flags(_clean_environment(GLIBC_TUNABLES=runtime.HUGE_PAGE_MALLOC_TUNABLE))


@needs_huge_pages
def test_entry_point_restarts_itself_with_the_tunable(tmp_path):
  """``python -m vqvdm_jax.main`` re-executes with the same PID and arguments, once; the config
  file (run when the flags are parsed, after the restart) reports what the process saw."""
  report = tmp_path / "report.txt"
  config = tmp_path / "reporting_config.py"
  config.write_text(textwrap.dedent(f"""
      import os
      def get_config(variant):
        with open({str(report)!r}, "a") as out:
          out.write(f"{{os.getpid()}} {{variant}} {{os.environ.get('GLIBC_TUNABLES')}}\\n")
        raise ValueError("the test config stops here")
  """))
  command = [sys.executable, "-m", "vqvdm_jax.main", f"--config={config}:abc",
             f"--workdir={tmp_path / 'w'}"]

  def run(environment):
    report.unlink(missing_ok=True)
    process = subprocess.Popen(command, env=environment, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and "the test config stops here" in stderr, stderr
    return process.pid, report.read_text().splitlines()

  pid, lines = run(_clean_environment())
  assert lines == [f"{pid} abc {runtime.HUGE_PAGE_MALLOC_TUNABLE}"]
  pid, lines = run(_clean_environment(**{runtime.KEEP_MALLOC_ENV: "1"}))
  assert lines == [f"{pid} abc None"]


@needs_huge_pages
def test_suite_workers_start_with_huge_page_malloc():
  """conftest.py sets the tunable before xdist starts its workers: a worker's environment at
  exec (what glibc read) holds it."""
  if "PYTEST_XDIST_WORKER" not in os.environ:
    pytest.skip("not an xdist worker")
  with open("/proc/self/environ", "rb") as environment:
    at_exec = environment.read().split(b"\0")
  assert f"GLIBC_TUNABLES={runtime.HUGE_PAGE_MALLOC_TUNABLE}".encode() in at_exec
