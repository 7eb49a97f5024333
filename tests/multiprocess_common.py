"""What the two-process test and its worker processes share: the run and its data."""

import numpy as np
from helpers import load_config

from vqvdm_jax.training import diffusion_trainer

LATENT_SHAPE = (2, 4, 4, 4)
NUM_STEPS = 3


def make_trainer(workdir, devices):
  config = load_config("tiny")
  config.mesh.shape = (4, 1)
  return diffusion_trainer.DiffusionTrainer(config, workdir, LATENT_SHAPE, devices=devices)


def global_batch(step):
  rng = np.random.default_rng(step)
  return {"latent": rng.normal(size=(8, *LATENT_SHAPE)).astype(np.float32),
          "label": rng.integers(0, 4, 8).astype(np.int32),
          "fps": np.full(8, 8.0, np.float32)}
