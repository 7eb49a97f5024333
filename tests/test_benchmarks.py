"""benchmarks/accelerator.sh's CPU dry run: every path of the accelerator script works, so lent
device time is never spent finding a broken benchmark."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_accelerator_script_dry_run_prints_every_row():
  env = dict(os.environ, DRY_RUN="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
  # One CPU device, as the script expects (not the tests' eight); compiled fast, as the tests
  # are (conftest.py): a dry run checks paths, not speed.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  # The suite's compilation cache (tests/conftest.py): a rerun compiles little.
  env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(),
                                                  f"vqvdm_jax_test_cache_{os.getuid()}")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
  done = subprocess.run(["bash", str(ROOT / "benchmarks/accelerator.sh")], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  table = done.stdout[done.stdout.index("### Accelerator run"):]
  for row in ("Table 3: 2 DDPM steps, latent", "Table 3: 2 DDPM steps, pixel",
              "Table 3: pixel / latent time", "train step: VQGAN", "train step: U-Net",
              "I3D logits"):
    assert row in table, done.stdout
