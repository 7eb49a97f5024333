"""Runs that survive interruption: SIGKILL, SIGTERM and non-finite updates.

The killed, resumed and SIGTERM runs are real processes of ``python -m vqvdm_jax.main``; they share
the test session's compilation cache, so only the first run (the uninterrupted reference, trained
in the test's own process) compiles the tiny train step.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from helpers import load_config
from xla_flags import compilation_cache_environment

from vqvdm_jax import checkpointing, runtime
from vqvdm_jax.training import diffusion_trainer, loop, vqgan_trainer

REPO = Path(__file__).resolve().parents[1]
LATENT_SHAPE = (2, 4, 4, 4)


def _command(workdir, num_steps, checkpoint_every=2):
  return [sys.executable, "-m", "vqvdm_jax.main", f"--config={REPO / 'configs/tiny.py'}",
          f"--workdir={workdir}", "--mode=train_vqgan",
          f"--config.vqgan.train.num_steps={num_steps}",
          f"--config.vqgan.train.checkpoint_every={checkpoint_every}",
          "--config.vqgan.train.eval_every=100000", "--config.vqgan.train.log_every=1"]


def _environment():
  environment = dict(os.environ)
  # XLA_FLAGS: conftest.py's (8 devices, fast compilation)
  environment.update(JAX_PLATFORMS="cpu", **compilation_cache_environment())
  return environment


def _start(workdir, num_steps, log_path):
  log = open(log_path, "w")  # noqa: SIM115 -- closed by the caller through the process
  return subprocess.Popen(_command(workdir, num_steps), cwd=REPO, env=_environment(),
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _run(workdir, num_steps, log_path):
  process = _start(workdir, num_steps, log_path)
  assert process.wait(timeout=400) == 0, Path(log_path).read_text()[-3000:]


def _train_in_process(workdir, num_steps):
  """:func:`_command`'s run, uninterrupted, in this process (no interpreter to start; its
  compiled programs land in the cache the subprocesses read): the final state, on the host."""
  config = load_config("tiny")
  train = config.vqgan.train
  train.num_steps, train.checkpoint_every, train.eval_every, train.log_every = (
      num_steps, 2, 100_000, 1)
  return jax.device_get(vqgan_trainer.train_vqgan(config, workdir))


def _wait_for(path, process, timeout=300):
  deadline = time.time() + timeout
  while not path.exists():
    assert process.poll() is None, "the run ended before it was interrupted"
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def _checkpointed_state(workdir, step):
  """The whole stage-1 state of ``workdir``'s checkpoint ``step``, on the host."""
  config = load_config("tiny")
  trainer = vqgan_trainer.VQGANTrainer(config, workdir, devices=jax.devices())
  state = trainer.checkpointer.restore(trainer.abstract_state(), step=step)
  trainer.checkpointer.close()
  return jax.device_get(state)


def _assert_same_leaves(got, want):
  """Equal tree structure and every leaf bit-identical, naming the leaf that differs."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, got_leaf), want_leaf in zip(jax.tree_util.tree_leaves_with_path(got),
                                         jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(want_leaf),
                                  err_msg=jax.tree_util.keystr(path))


def _sleep_unless_appears(path, seconds, process):
  """Sleeps ``seconds``, less if ``path`` appears first; fails if the run ends meanwhile."""
  deadline = time.time() + seconds
  while time.time() < deadline and not path.exists():
    assert process.poll() is None, "the run ended before it was interrupted"
    time.sleep(0.01)


def test_a_run_killed_at_a_random_moment_resumes_to_the_uninterrupted_result(tmp_path):
  num_steps = 6
  reference = _train_in_process(tmp_path / "reference", num_steps)
  checkpoints = tmp_path / "killed" / "vqgan" / "checkpoints"
  process = _start(tmp_path / "killed", num_steps, tmp_path / "killed.log")
  _wait_for(checkpoints / "2", process)
  # A random moment after the step-2 checkpoint, and no later than the step-4 one appearing: the
  # run still has steps 5 and 6 and their save ahead of it, however fast the machine is.
  _sleep_unless_appears(checkpoints / "4", random.uniform(0.0, 1.0), process)
  assert process.poll() is None, "the run ended before it was killed"
  os.killpg(process.pid, signal.SIGKILL)
  process.wait(timeout=60)
  killed_at = max(checkpointing.checkpoint_steps(checkpoints))
  assert 2 <= killed_at < num_steps, killed_at  # the resumed run has steps left to train
  _run(tmp_path / "killed", num_steps, tmp_path / "resumed.log")
  resumed_log = (tmp_path / "resumed.log").read_text()
  assert f"training from step {killed_at} to {num_steps}" in resumed_log, resumed_log[-3000:]
  resumed = _checkpointed_state(tmp_path / "killed", num_steps)
  assert int(resumed.step) == num_steps
  # Every field: weights, both optimizers, EMA, quantizer state, LeCam EMAs, rng, step.
  _assert_same_leaves(resumed, reference)


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
  process = _start(tmp_path, 100_000, tmp_path / "run.log")
  _wait_for(tmp_path / "vqgan" / "checkpoints" / "2", process)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=120) == 0
  log = (tmp_path / "run.log").read_text()
  assert "Preempted at step" in log, log[-3000:]
  stopped_at = int(log.split("Preempted at step ")[1].split(":")[0])
  assert stopped_at >= 2
  assert (tmp_path / "vqgan" / "checkpoints" / str(stopped_at)).exists()
  # The terminal a person reads: the project's lines (progress, saves), no library INFO.
  assert "Stage 1 step 2/100000 (0%)" in log and "steps/s, ETA" in log and "| l2 " in log, log
  assert "Stage 1: compiling the train step ..." in log, log
  info_lines = [line for line in log.splitlines() if line.startswith("I")]
  assert not [line for line in info_lines if "checkpoint_manager.py" in line
              or "async_checkpointer" in line or "logging_writer.py" in line], log


def _diffusion_trainer(tmp_path):
  config = load_config("tiny")
  config.diffusion.train.checkpoint_every = 1000
  return config, diffusion_trainer.DiffusionTrainer(config, tmp_path, LATENT_SHAPE,
                                                    devices=jax.devices()[:1])


def _batches(nan_steps=()):
  """A grain iterator (checkpointable, like the real ones) whose batch ``s`` is for step s + 1."""

  def batch(index):
    latent = np.random.default_rng(index).normal(size=(8, *LATENT_SHAPE)).astype(np.float32)
    if index + 1 in nan_steps:
      latent[0, 0, 0, 0, 0] = np.nan
    return {"latent": latent, "label": np.arange(8, dtype=np.int32) % 4,
            "fps": np.full(8, 8.0, np.float32)}

  return iter(grain.MapDataset.range(100).map(batch).to_iter_dataset())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_and_ctrl_c_in_process_lose_no_step(tmp_path, signum):
  config, trainer = _diffusion_trainer(tmp_path)
  states = {}
  # What the process had before (a shell that starts it in the background ignores SIGINT).
  handlers_before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}

  def step_fn(state, batch):
    state, metrics = trainer.step(state, batch)
    step = int(state.step)
    states[step] = jax.device_get(state.params)
    if step == 3:
      os.kill(os.getpid(), signum)  # as a preempted VM, or a person at the terminal, sends it
    return state, metrics

  with pytest.raises(runtime.Preempted, match="Preempted at step 3"):
    loop.train_loop(stage="Stage 2", state=trainer.initial_state(1.0, 0), step_fn=step_fn,
                    data_iterator=_batches(), checkpointer=trainer.checkpointer, num_steps=50,
                    log_every=1, batch_size=8, summary_dir=tmp_path / "summaries",
                    max_nonfinite_skips=5, learning_rate_field="diffusion.optim.learning_rate")
  # The guard put the process's own handlers back.
  assert {signum: signal.getsignal(signum) for signum in handlers_before} == handlers_before
  _, reopened = _diffusion_trainer(tmp_path)  # the loop closed the run's checkpointer
  assert reopened.checkpointer.latest_step() == 3
  restored = reopened.restore()
  reopened.checkpointer.close()
  for got, want in zip(jax.tree.leaves(jax.device_get(restored.params)),
                       jax.tree.leaves(states[3]), strict=True):
    np.testing.assert_array_equal(got, want)


def test_nonfinite_updates_are_skipped_and_too_many_stop_the_run(tmp_path):
  config, trainer = _diffusion_trainer(tmp_path)
  state = trainer.initial_state(1.0, 0)
  batches = _batches(nan_steps={2, 4, 5, 6})
  state, _ = trainer.step(state, next(batches))
  before = jax.device_get(state)
  state, metrics = trainer.step(state, next(batches))  # step 2: NaN in the batch
  assert float(metrics["nonfinite/skipped"]) == 1.0
  assert int(state.step) == 2 and int(state.nonfinite_streak) == 1
  for got, want in zip(jax.tree.leaves(jax.device_get((state.params, state.opt_state))),
                       jax.tree.leaves((before.params, before.opt_state)), strict=True):
    np.testing.assert_array_equal(got, want)  # the update was skipped entirely
  state, metrics = trainer.step(state, next(batches))  # step 3: finite again
  assert int(state.nonfinite_streak) == 0 and float(metrics["nonfinite/skipped"]) == 0.0
  assert np.all(np.isfinite(np.asarray(jax.tree.leaves(state.params)[0])))
  trainer.checkpointer.save(3, state, force=True)

  with pytest.raises(loop.NonFiniteUpdates, match="step 6.*last good checkpoint is step 3"):
    loop.train_loop(stage="Stage 2", state=state, step_fn=trainer.step, data_iterator=batches,
                    checkpointer=trainer.checkpointer, num_steps=50, log_every=1,
                    batch_size=8, summary_dir=tmp_path / "summaries", max_nonfinite_skips=3,
                    learning_rate_field="diffusion.optim.learning_rate")
