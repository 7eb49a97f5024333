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
from helpers import cheap_i3d, load_config, relative_update_difference, untrained_checkpoints
from multiprocess_common import NUM_STEPS, evaluation_config, global_batch, make_trainer

from vqvdm_jax.evaluation import evaluate, evaluate_vqgan

TESTS = Path(__file__).resolve().parent
EVALUATED_STEP = 3  # the step of the untrained checkpoints the evaluation test restores


def _free_port():
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory):
  """``multiprocess_worker.py`` as processes 0 and 1: the training run's workdir and the
  evaluated one (untrained checkpoints of both tiny stages, then the workers' results)."""
  trained, evaluated = (tmp_path_factory.mktemp(name) for name in ("trained", "evaluated"))
  untrained_checkpoints(load_config("tiny"), evaluated, jax.devices()[:1], EVALUATED_STEP)
  port = _free_port()
  environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
  workers = [subprocess.Popen(
      [sys.executable, str(TESTS / "multiprocess_worker.py"), str(port), str(index), str(trained),
       str(evaluated)], env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for index in range(2)]
  outputs = [worker.communicate(timeout=500)[0] for worker in workers]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]
  return trained, evaluated


def test_two_processes_end_with_the_parameters_of_one_device(cluster_runs, tmp_path):
  # The reference is the plain computation on one device.
  single = make_trainer(tmp_path, jax.devices()[:1])
  state = single.initial_state(1.5, 0)
  initial_params = jax.device_get(state.params)  # the step donates the state
  for step in range(NUM_STEPS):
    state, _ = single.step(state, global_batch(step))
  single.checkpointer.close()

  reader = make_trainer(cluster_runs[0], jax.devices()[:4])
  restored = reader.restore()
  reader.checkpointer.close()
  assert int(restored.step) == NUM_STEPS
  # Gradients agree to float32 rounding: gloo and the in-process all-reduce only sum in another
  # order. Adam's moments are compared relative to each array's scale (the first is 0.1 x the
  # running gradient). Adam's g / sqrt(v) step turns the rounding of a near-zero gradient into
  # up to a full step of lr for that weight, so the weights' updates are compared as a whole
  # (helpers.relative_update_difference).
  first_moments = [restored.opt_state[1][0].mu, state.opt_state[1][0].mu]
  for got, want in zip(*(jax.tree.leaves(jax.device_get(tree)) for tree in first_moments),
                       strict=True):
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max() + 1e-9
  assert relative_update_difference(state.params, restored.params, initial_params) < 2e-2


def test_two_processes_evaluate_like_one_process_with_four_devices(cluster_runs):
  workdir = cluster_runs[1]
  returned = [json.loads((workdir / f"process_{index}.json").read_text()) for index in range(2)]
  written = {"evaluate": json.loads((workdir / "eval" / "000" / "results.json").read_text()),
             "evaluate_vqgan": json.loads(
                 (workdir / "vqgan" / "eval" / "000" / "eval.json").read_text())}
  # Process 0 alone wrote the reference cache, once.
  assert len(list((workdir / "reference_two_processes").iterdir())) == 1

  config = evaluation_config(workdir, "one_process")  # its own reference features
  with cheap_i3d():  # as the workers': both sides compute the same thing, cheaper
    single = {"evaluate": evaluate.evaluate(config, workdir, devices=jax.devices()[:4]),
              "evaluate_vqgan": evaluate_vqgan.evaluate_vqgan(config, workdir,
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
