"""Two real processes (JAX distributed runtime, gloo CPU collectives) train and evaluate as one."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import cheap_i3d, load_config, untrained_checkpoints
from multiprocess_common import NUM_STEPS, evaluation_config, global_batch, make_trainer

from vqvdm_jax.evaluation import evaluate, evaluate_vqgan

TESTS = Path(__file__).resolve().parent
EVALUATED_STEP = 3  # the step of the untrained checkpoints the evaluation test restores


def _free_port():
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _run_two_workers(script: str, workdir) -> None:
  """``python SCRIPT PORT PROCESS_ID WORKDIR`` as processes 0 and 1; fails with their output."""
  port = _free_port()
  environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
  workers = [subprocess.Popen(
      [sys.executable, str(TESTS / script), str(port), str(index), str(workdir)],
      env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for index in range(2)]
  outputs = [worker.communicate(timeout=400)[0] for worker in workers]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]


def test_two_processes_end_with_the_parameters_of_one_device(tmp_path):
  _run_two_workers("multiprocess_worker.py", tmp_path / "two_processes")

  # The reference is the plain computation on one device (the tiny step other tests compile too,
  # so it often comes from the compilation cache).
  single = make_trainer(tmp_path / "one_process", jax.devices()[:1])
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


def test_two_processes_evaluate_like_one_process_with_four_devices(tmp_path):
  untrained_checkpoints(load_config("tiny"), tmp_path, jax.devices()[:1], EVALUATED_STEP)
  _run_two_workers("multiprocess_evaluate_worker.py", tmp_path)
  returned = [json.loads((tmp_path / f"process_{index}.json").read_text()) for index in range(2)]
  written = {"evaluate": json.loads((tmp_path / "eval" / "000" / "results.json").read_text()),
             "evaluate_vqgan": json.loads((tmp_path / "vqgan" / "eval" / "000" / "eval.json").read_text())}
  # Process 0 alone wrote the reference cache, once.
  assert len(list((tmp_path / "reference_two_processes").iterdir())) == 1

  config = evaluation_config(tmp_path, "one_process")  # its own reference features
  with cheap_i3d():  # as the workers': both sides compute the same thing, cheaper
    single = {"evaluate": evaluate.evaluate(config, tmp_path, devices=jax.devices()[:4]),
              "evaluate_vqgan": evaluate_vqgan.evaluate_vqgan(config, tmp_path,
                                                              devices=jax.devices()[:4])}
  compared = {"evaluate": ("fvd", "kvd"),
              "evaluate_vqgan": ("psnr", "ssim", "lpips", "rfvd", "codebook_usage",
                                 "codebook_perplexity")}
  assert single["evaluate"]["num_samples_fvd"] == single["evaluate_vqgan"]["num_clips"] == 4
  # Both processes return, and process 0 writes, the numbers of one process. The reconstruction
  # metrics agree bit for bit; I3D's features to float32 rounding (its CPU convolutions are not
  # bit-identical across process layouts), which moves FVD and KVD by under 1e-6 of themselves.
  for results in [*returned, written]:
    for mode, metrics in compared.items():
      for metric in metrics:
        assert results[mode][metric] == pytest.approx(single[mode][metric], rel=1e-5), (
            mode, metric)
