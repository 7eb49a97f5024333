"""What the two-process tests and their worker processes share: the runs and their data."""

from pathlib import Path

import numpy as np
from helpers import load_config

from vqvdm_jax.training import diffusion_trainer

LATENT_SHAPE = (2, 4, 4, 4)
NUM_STEPS = 3


def make_trainer(workdir, devices):
  """The tiny stage-2 trainer, data-parallel over ``devices`` (the workers: 2 processes x 2),
  with a one-level U-Net without attention.

  What the two-process test claims is about data parallelism (each process's half of the batch,
  gradients summed across processes), which the U-Net's depth does not change. Each worker
  compiles the init and the step itself, on cores the other test worker shares; the tiny
  two-level U-Net with attention took ~15 s + ~17 s of that in the suite, and this one about
  half as much.
  """
  config = load_config("tiny")
  config.mesh.shape = (len(devices), 1)
  config.diffusion.unet.channel_multipliers = (1,)
  config.diffusion.unet.attention_levels = ()
  return diffusion_trainer.DiffusionTrainer(config, workdir, LATENT_SHAPE, devices=devices)


def global_batch(step):
  rng = np.random.default_rng(step)
  return {"latent": rng.normal(size=(8, *LATENT_SHAPE)).astype(np.float32),
          "label": rng.integers(0, 4, 8).astype(np.int32),
          "fps": np.full(8, 8.0, np.float32)}


def evaluation_config(workdir, run: str):
  """The tiny config evaluated on 4 clips: one I3D batch, one clip on each of 4 devices.

  ``run`` names the reference-feature cache directory, so that each run computes its own.
  """
  config = load_config("tiny")
  evaluation = config.evaluation
  evaluation.num_samples_fvd = evaluation.batch_size = 4
  evaluation.reference_dir = str(Path(workdir) / f"reference_{run}")
  evaluation.reconstruction_fvd = True
  config.diffusion.sample.num_steps = 2
  config.diffusion.sample.batch_size = 4
  config.vqgan.eval.num_clips = config.vqgan.eval.batch_size = 4
  return config
