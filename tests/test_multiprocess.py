"""Two real processes (JAX distributed runtime, gloo CPU collectives) train like one."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from multiprocess_common import NUM_STEPS, global_batch, make_trainer

TESTS = Path(__file__).resolve().parent


def _free_port():
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def test_two_processes_end_with_the_parameters_of_one_process_with_four_devices(tmp_path):
  port = _free_port()
  environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
  workers = [subprocess.Popen(
      [sys.executable, str(TESTS / "multiprocess_worker.py"), str(port), str(index),
       str(tmp_path / "two_processes")], env=environment, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for index in range(2)]
  outputs = [worker.communicate(timeout=400)[0] for worker in workers]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]

  single = make_trainer(tmp_path / "one_process", jax.devices()[:4])
  state = single.initial_state(1.5, 0)
  for step in range(NUM_STEPS):
    state, _ = single.step(state, global_batch(step))
  single.checkpointer.close()

  reader = make_trainer(tmp_path / "two_processes", jax.devices()[:4])
  restored = reader.restore()
  reader.checkpointer.close()
  assert int(restored.step) == NUM_STEPS
  # Gradients agree to float32 rounding: gloo and the in-process all-reduce only sum in another
  # order. Adam's moments are compared relative to each array's scale (the first is 0.1 x the
  # running gradient); the weights to a fraction of lr = 1e-3, since Adam's g / sqrt(v) step
  # turns rounding in a near-zero gradient into up to a fraction of lr.
  first_moments = [restored.opt_state[1][0].mu, state.opt_state[1][0].mu]
  for got, want in zip(*(jax.tree.leaves(jax.device_get(tree)) for tree in first_moments),
                       strict=True):
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max() + 1e-9
  for got, want in zip(jax.tree.leaves(jax.device_get(restored.params)),
                       jax.tree.leaves(jax.device_get(state.params)), strict=True):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
