"""One process of the two-process evaluation test: the reference cache, --mode=evaluate and
--mode=evaluate_vqgan.

Run as ``python multiprocess_evaluate_worker.py PORT PROCESS_ID WORKDIR`` on a workdir holding
checkpoints of both stages; 2 CPU devices per process. Only process 0 writes the results files,
so each process also leaves what its calls returned in ``WORKDIR/process_ID.json``.
"""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vqvdm_jax import runtime  # noqa: E402


def main(port: str, process_id: str, workdir: str) -> None:
  runtime.initialize_distributed(f"127.0.0.1:{port}", 2, int(process_id))
  runtime.configure_jax()
  from multiprocess_common import evaluation_config

  from vqvdm_jax.evaluation import evaluate, evaluate_vqgan, features
  from vqvdm_jax.training import sharding

  assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
  config = evaluation_config(workdir, "two_processes")
  # The reference cache, first missed (the processes extract together, process 0 writes), then
  # hit (process 0 reads, the others receive): both give every process the same arrays.
  extractor = features.i3d_extractor(sharding.make_mesh(config.mesh),
                                     config.evaluation.batch_size)
  computed, _ = evaluate.reference_features(config, extractor, config.evaluation.num_samples_fvd)
  cached, _ = evaluate.reference_features(config, extractor, config.evaluation.num_samples_fvd)
  for name, array in computed.items():
    np.testing.assert_array_equal(cached[name], array)
  returned = {"evaluate": evaluate.evaluate(config, workdir),
              "evaluate_vqgan": evaluate_vqgan.evaluate_vqgan(config, workdir)}
  Path(workdir, f"process_{process_id}.json").write_text(json.dumps(returned))


if __name__ == "__main__":
  main(*sys.argv[1:])
