"""One process of the two-process test: a few stage-2 steps on its half of every batch.

Run as ``python multiprocess_worker.py PORT PROCESS_ID WORKDIR``; 2 CPU devices per process.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from vqvdm_jax import runtime  # noqa: E402


def main(port: str, process_id: str, workdir: str) -> None:
  runtime.initialize_distributed(f"127.0.0.1:{port}", 2, int(process_id))
  runtime.configure_jax()
  from multiprocess_common import NUM_STEPS, global_batch, make_trainer

  assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
  trainer = make_trainer(workdir, jax.devices())
  state = trainer.initial_state(1.5, 0)
  rows = slice(jax.process_index() * 4, (jax.process_index() + 1) * 4)  # this process's half
  for step in range(NUM_STEPS):
    local = {key: value[rows] for key, value in global_batch(step).items()}
    state, _ = trainer.step(state, local)
  trainer.checkpointer.save(NUM_STEPS, state, force=True)  # collective, through Orbax
  trainer.checkpointer.close()


if __name__ == "__main__":
  main(*sys.argv[1:])
