"""One process of the two-process tests: a few stage-2 steps on its half of every batch, then
the reference cache, --mode=evaluate and --mode=evaluate_vqgan on checkpoints of both stages.

Run as ``python multiprocess_worker.py PORT PROCESS_ID TRAIN_WORKDIR EVALUATE_WORKDIR``; 2 CPU
devices per process. One cluster serves both tests: starting two interpreters and joining them
costs more than either test's own work. Only process 0 writes the results files, so each
process also leaves what its evaluations returned in ``EVALUATE_WORKDIR/process_ID.json``.
"""

import json
import sys
from pathlib import Path

import jax  # noqa: E402
import numpy as np  # noqa: E402
from multiprocess_setup import join_two_process_cluster  # first: it sets up JAX's devices


def train(workdir: str) -> None:
  from multiprocess_common import NUM_STEPS, global_batch, make_trainer

  trainer = make_trainer(workdir, jax.devices())
  state = trainer.initial_state(1.5, 0)
  rows = slice(jax.process_index() * 4, (jax.process_index() + 1) * 4)  # this process's half
  for step in range(NUM_STEPS):
    local = {key: value[rows] for key, value in global_batch(step).items()}
    state, _ = trainer.step(state, local)
  trainer.checkpointer.save(NUM_STEPS, state, force=True)  # collective, through Orbax
  trainer.checkpointer.close()


def evaluate_both(workdir: str, process_id: str) -> None:
  from helpers import cheap_i3d
  from multiprocess_common import evaluation_config

  from vqvdm_jax import sharding
  from vqvdm_jax.evaluation import evaluate, evaluate_vqgan, features

  config = evaluation_config(workdir, "two_processes")
  with cheap_i3d():  # as the test's one-process evaluation
    # The reference cache, first missed (the processes extract together, process 0 writes), then
    # hit (process 0 reads, the others receive): both give every process the same arrays.
    extractor = features.i3d_extractor(sharding.make_mesh(config.mesh),
                                       config.evaluation.batch_size)
    computed, _ = evaluate.reference_features(config, extractor,
                                              config.evaluation.num_samples_fvd)
    cached, _ = evaluate.reference_features(config, extractor, config.evaluation.num_samples_fvd)
    for name, array in computed.items():
      np.testing.assert_array_equal(cached[name], array)
    returned = {"evaluate": evaluate.evaluate(config, workdir),
                "evaluate_vqgan": evaluate_vqgan.evaluate_vqgan(config, workdir)}
  Path(workdir, f"process_{process_id}.json").write_text(json.dumps(returned))


def main(port: str, process_id: str, train_workdir: str, evaluate_workdir: str) -> None:
  join_two_process_cluster(port, process_id)
  train(train_workdir)
  evaluate_both(evaluate_workdir, process_id)


if __name__ == "__main__":
  main(*sys.argv[1:])
