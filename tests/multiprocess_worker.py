"""One process of the two-process test: a few stage-2 steps on its half of every batch.

Run as ``python multiprocess_worker.py PORT PROCESS_ID WORKDIR``; 2 CPU devices per process.
"""

import sys

import jax  # noqa: E402
from multiprocess_setup import join_two_process_cluster  # first: it sets up JAX's devices


def main(port: str, process_id: str, workdir: str) -> None:
  join_two_process_cluster(port, process_id)
  from multiprocess_common import NUM_STEPS, global_batch, make_trainer

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
