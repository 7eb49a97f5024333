"""Shared test helpers: load a shipped config by name; checkpoints of untrained models; a cheap
I3D for tests that compare evaluation paths; an independent (numpy, float64) bilinear resize,
the reference of the I3D and C3D protocols."""

import contextlib
import importlib.util
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqvdm_jax.models.vqgan import latent_shape
from vqvdm_jax.training import diffusion_trainer, vqgan_trainer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def stage1_options_config():
  """The tiny config with every optional stage-1 term on: the EMA codebook, the hinge GAN loss,
  the adaptive discriminator weight, LeCam, LPIPS, and the discriminator from step 0. Tests of
  one stage-1 step share it, so they share its compiled step (the suite's compilation cache)."""
  config = load_config("tiny")
  config.vqgan.quantizer.kind = "ema"
  config.vqgan.loss.gan_loss = "hinge"
  config.vqgan.loss.adaptive_disc_weight = True
  config.vqgan.loss.lecam_weight = 0.1
  config.vqgan.loss.disc_start = 0
  config.vqgan.loss.lpips_weight = 1.0  # the tiny config has none
  return config


def compile_for_many_steps(jitted: Any, *args: Any) -> Any:
  """``jitted`` compiled for ``args`` at XLA's default optimisation, for a test of many steps.

  conftest.py compiles at level 0, which compiles fast but runs tiny steps up to 7x slower: the
  tiny stage-2 step compiles in 19 s and runs 0.28 s a step of CPU at level 0, against 35 s and
  0.04 s at the default, so a 60-150-step learning test is faster at the default. Also with XLA's
  fusion emitters, which conftest.py turns off for level 0: one cold run of the stage-2 step's
  level-3 compile took 68 s of wall without them, 23 s with (a loaded machine; not re-measured).
  """
  return jitted.lower(*args).compile({"xla_backend_optimization_level": 3,
                                      "xla_llvm_disable_expensive_passes": False,
                                      "xla_cpu_use_fusion_emitters": True})


def untrained_checkpoints(config, workdir, devices, step: int, *more_steps: int) -> None:
  """Stage-1 and stage-2 checkpoints of freshly initialised models at ``step`` (and each of
  ``more_steps``: the same weights under other step numbers).

  Evaluation needs weights, not good ones; training the tiny stages first would spend minutes
  of CPU compiling their train steps.
  """
  vqgan = vqgan_trainer.VQGANTrainer(config, workdir, devices)
  at_step = lambda state, each: state.replace(step=jnp.asarray(each, jnp.int32))  # noqa: E731
  for each in (step, *more_steps):
    vqgan.checkpointer.save(each, at_step(vqgan.initial_state(), each), force=True)
  vqgan.checkpointer.close()
  diffusion = diffusion_trainer.DiffusionTrainer(
      config, workdir, latent_shape(config)[1:], devices)
  for each in (step, *more_steps):
    diffusion.checkpointer.save(each, at_step(diffusion.initial_state(1.0, each), each),
                                force=True)
  diffusion.checkpointer.close()


# I3D at a quarter of the protocol's pixels (112x112, not 224x224), for tests that compare two
# ways of computing the same evaluation with each other, never with published numbers: the
# network runs ~4x less. tests/test_i3d.py and tests/test_evaluate.py keep the protocol's size.
TEST_I3D_RESOLUTION = 112


@contextlib.contextmanager
def cheap_i3d(resolution: int = TEST_I3D_RESOLUTION):
  """I3D's input resized to ``resolution`` inside the block (compiled extractors are dropped on
  the way in and out, so none of either size leaks into other tests)."""
  from vqvdm_jax.evaluation import features, i3d
  protocol_resolution = i3d.RESOLUTION
  i3d.RESOLUTION = resolution
  features.i3d_extractor.cache_clear()
  try:
    yield
  finally:
    i3d.RESOLUTION = protocol_resolution
    features.i3d_extractor.cache_clear()


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of a half-pixel-centre bilinear resize, no antialiasing.

  Output pixel i samples input coordinate (i + 0.5) * size_in / size_out - 0.5 (clamped to the
  edge pixels) from its two nearest input pixels.
  """
  source = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
  low = np.floor(source).astype(int)
  high = np.minimum(low + 1, size_in - 1)
  weights = np.zeros((size_out, size_in))
  np.add.at(weights, (np.arange(size_out), low), 1.0 - (source - low))
  np.add.at(weights, (np.arange(size_out), high), source - low)
  return weights


def bilinear_resize(video: np.ndarray, height: int, width: int) -> np.ndarray:
  """``[..., H, W, C]`` -> ``[..., height, width, C]`` in float64, one axis at a time."""
  *lead, h, w, c = video.shape
  rows = bilinear_matrix(h, height) @ video.astype(np.float64).reshape(*lead, h, w * c)
  return bilinear_matrix(w, width) @ rows.reshape(*lead, height, w, c)


def relative_difference(a: Any, b: Any) -> float:
  """||a - b|| / ||a|| over every leaf of two pytrees (on the host)."""
  pairs = list(zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)),
                   strict=True))
  difference = sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2)) for x, y in pairs)
  return (difference / sum(float(np.sum(np.asarray(x) ** 2)) for x, _ in pairs)) ** 0.5


def relative_update_difference(after_a: Any, after_b: Any, initial: Any) -> float:
  """:func:`relative_difference` of two steps' updates from the same ``initial`` pytree. Adam's
  g / sqrt(v) turns the rounding of a near-zero gradient into up to a full step of lr for that
  weight, so two correct steps that sum in another order (sharded, or in two processes) agree
  as a whole, not weight by weight; a data-parallel bug changes the update completely."""
  initial = jax.device_get(initial)
  return relative_difference(jax.tree.map(np.subtract, jax.device_get(after_a), initial),
                             jax.tree.map(np.subtract, jax.device_get(after_b), initial))
