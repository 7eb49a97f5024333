"""Shared test helpers: load a shipped config by name; checkpoints of untrained models."""

import importlib.util
from pathlib import Path

import jax.numpy as jnp

from vqvdm_jax.models.vqgan import latent_shape
from vqvdm_jax.training import diffusion_trainer, vqgan_trainer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def untrained_checkpoints(config, workdir, devices, step: int) -> None:
  """Stage-1 and stage-2 checkpoints of freshly initialised models at ``step``.

  Evaluation needs weights, not good ones; training the tiny stages first would spend minutes
  of CPU compiling their train steps.
  """
  vqgan = vqgan_trainer.VQGANTrainer(config, workdir, devices)
  at_step = lambda state: state.replace(step=jnp.asarray(step, jnp.int32))  # noqa: E731
  vqgan.checkpointer.save(step, at_step(vqgan.initial_state()), force=True)
  vqgan.checkpointer.close()
  diffusion = diffusion_trainer.DiffusionTrainer(
      config, workdir, latent_shape(config)[1:], devices)
  diffusion.checkpointer.save(step, at_step(diffusion.initial_state(1.0, step)), force=True)
  diffusion.checkpointer.close()
