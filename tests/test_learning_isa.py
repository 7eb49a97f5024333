"""The learning tests hold on another instruction set, not only on the machine that tuned them.

XLA:CPU generates code for the host's widest vector instructions (AVX-512, AVX2, ...), so its
float rounding, and with it a training trajectory, differs between CPUs. Every test marked
``learning`` must pass whatever the rounding; this runs them again with XLA:CPU held to SSE4.2
code (``--xla_cpu_max_isa``), which differs from the default on any x86 CPU of the last decade.

It recompiles every learning test for the other instruction set (no compilation cache is
shared across XLA flags): 70-150 s of one worker, which the suite's 15-minute budget on 2 cores
does not hold today (16 min 25 s with it, matmul 140-150 GFLOP/s). So it runs when asked:
``VQVDM_CHECK_ISA=1 python -m pytest tests/test_learning_isa.py`` (README, Reproducibility).
"""

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="--xla_cpu_max_isa names x86 instruction sets")
@pytest.mark.skipif(os.environ.get("VQVDM_CHECK_ISA") != "1",
                    reason="set VQVDM_CHECK_ISA=1: recompiling for SSE4.2 exceeds the suite budget")
def test_learning_tests_pass_with_sse4_2_code():
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_cpu_max_isa=SSE4_2"  # + conftest's
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-m", "learning", "-p", "no:cacheprovider",
       "-n", "0", str(REPO / "tests")],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=540)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  passed = re.search(r"(\d+) passed", result.stdout)
  assert passed and int(passed.group(1)) >= 3, result.stdout[-2000:]  # not an empty selection
