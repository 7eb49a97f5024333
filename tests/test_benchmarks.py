"""Benchmark scripts at tiny sizes: benchmarks/accelerator.sh's CPU dry run (every path of the
accelerator script works, so lent device time is never spent finding a broken benchmark), and
benchmarks/priors.py on the tiny config."""

import os
import subprocess
import sys
from pathlib import Path

from xla_flags import compilation_cache_environment, fast_compile_xla_flags

ROOT = Path(__file__).resolve().parents[1]


def test_accelerator_script_dry_run_prints_every_row():
  env = dict(os.environ, DRY_RUN="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
  # One CPU device, as the script expects (not the tests' eight); compiled fast, as the tests
  # are (conftest.py): a dry run checks paths, not speed.
  env["XLA_FLAGS"] = fast_compile_xla_flags()
  # The suite's compilation cache (tests/conftest.py): a rerun compiles little.
  env.update(compilation_cache_environment())
  done = subprocess.run(["bash", str(ROOT / "benchmarks/accelerator.sh")], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  table = done.stdout[done.stdout.index("### Accelerator run"):]
  for row in ("Table 3: 2 DDPM steps, latent", "Table 3: 2 DDPM steps, pixel",
              "Table 3: pixel / latent time", "train step: VQGAN", "train step: U-Net",
              "I3D logits"):
    assert row in table, done.stdout


def test_priors_side_by_side_trains_and_measures_each_prior(tmp_path):
  """benchmarks/priors.py on the tiny config's (untrained) stage-1 checkpoint, with a budget
  that leaves room for a resumed run after the warm-up (4 s: the diffusion prior's warm-up
  measured 1.47 steps/s on a loaded 2-core machine, and 2 s x 1.47 was no step past it): each
  prior asked for gets a row, steps beyond the warm-up, sampling times and probe scores (FVD is
  `--mode=evaluate`'s, tested there). The latent-diffusion prior and one token prior: the
  autoregressive one runs the same benchmark code as the masked one (train_prior, TokenModel),
  at ~45 s of the suite's CPU."""
  import jax
  import jax.numpy as jnp
  from helpers import load_config

  from vqvdm_jax.data import pipeline
  from vqvdm_jax.training import vqgan_trainer

  config = load_config("tiny")
  trainer = vqgan_trainer.VQGANTrainer(config, tmp_path, jax.devices()[:1])
  step = config.vqgan.train.num_steps
  trainer.checkpointer.save(
      step, trainer.initial_state().replace(step=jnp.asarray(step)),
      pipeline.train_iterator(config.data, config.vqgan.train.batch_size, config.seed),
      force=True)
  trainer.checkpointer.close()
  env = dict(os.environ, XLA_FLAGS=fast_compile_xla_flags(), **compilation_cache_environment())
  done = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks/priors.py"), f"--config={ROOT}/configs/tiny.py",
       f"--workdir={tmp_path}", "--budget_s=4", "--warmup_steps=2", "--num_videos=4",
       "--repeats=1", "--probe_videos=4", "--probe_clips=16", "--probe_steps=2", "--num_fvd=0",
       "--priors=diffusion,masked"],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  table = done.stdout[done.stdout.index("### Stage-2 priors"):]
  rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")][2:]
  assert [row[0] for row in rows] == ["| diffusion", "| masked"], table
  for row in rows:
    steps = int(row[1].split()[0])
    assert steps > 2, table  # the resumed run trained past the warm-up
    accuracy = float(row[4].split()[0])
    assert 0 <= accuracy <= 1 and row[7] == "-", table
