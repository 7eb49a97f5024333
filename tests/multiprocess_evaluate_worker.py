"""One process of the two-process evaluation test: the reference cache, --mode=evaluate and
--mode=evaluate_vqgan.

Run as ``python multiprocess_evaluate_worker.py PORT PROCESS_ID WORKDIR`` on a workdir holding
checkpoints of both stages; 2 CPU devices per process. Only process 0 writes the results files,
so each process also leaves what its calls returned in ``WORKDIR/process_ID.json``.
"""

import json
import sys
from pathlib import Path

import numpy as np  # noqa: E402
from multiprocess_setup import join_two_process_cluster  # first: it sets up JAX's devices


def main(port: str, process_id: str, workdir: str) -> None:
  join_two_process_cluster(port, process_id)
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


if __name__ == "__main__":
  main(*sys.argv[1:])
