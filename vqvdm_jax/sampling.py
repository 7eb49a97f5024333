"""Sampling videos: noise -> DDPM/DDIM with guidance (VQ-VDM eq. 9) -> unscale -> quantize -> decode.

``--mode=sample`` writes ``DIR/samples/video_XXX_class_C.mp4`` per video and ``grid.gif`` (one
column per video), with ``samples.json`` recording what was asked for. The whole reverse process
is one compiled loop; the sample batch is split over the mesh's batch axes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from vqvdm_jax import fileio, video_io
from vqvdm_jax.data import latents as latents_lib
from vqvdm_jax.diffusion import samplers
from vqvdm_jax.diffusion.schedule import DiffusionSchedule
from vqvdm_jax.models.unet3d import UNet3D
from vqvdm_jax.models.vqgan import latent_shape
from vqvdm_jax.training import diffusion_trainer, sharding, vqgan_trainer

PyTree = Any


def sample_labels(config: ml_collections.ConfigDict, num_videos: int) -> np.ndarray:
  """The class of each video: ``sample.label``, or every class in turn when it is -1."""
  label = config.diffusion.sample.label
  if not config.diffusion.use_class:
    return np.zeros(num_videos, np.int32)
  if label >= 0:
    return np.full(num_videos, label, np.int32)
  return (np.arange(num_videos) % config.data.num_classes).astype(np.int32)


def make_sample_fn(config: ml_collections.ConfigDict, unet: UNet3D,
                   schedule: DiffusionSchedule, latent_shape: tuple[int, ...]):
  """``sample_fn(params, labels [B], fps [B], rng) -> scaled latents [B, t, h, w, c]``."""
  sample = config.diffusion.sample
  apply_fn = diffusion_trainer.apply_unet(unet, config)
  clip_x0 = sample.clip_x0 or None

  def sample_fn(params, labels, fps, rng):
    model_fn = samplers.make_guided_model_fn(
        apply_fn, params, fps if config.diffusion.use_fps else None,
        labels if config.diffusion.use_class else None,
        diffusion_trainer.null_label(config), sample.guidance_scale,
        tuple(sample.guidance_interval) if sample.guidance_interval else None)
    shape = (labels.shape[0], *latent_shape)
    if sample.sampler == "ddpm":
      return samplers.ddpm_sample(model_fn, schedule, shape, rng, config.diffusion.prediction,
                                  clip_x0, sample.num_steps)
    return samplers.ddim_sample(model_fn, schedule, shape, rng, sample.num_steps, sample.eta,
                                config.diffusion.prediction, clip_x0)

  return sample_fn


def generate_batches(config: ml_collections.ConfigDict,
                     state: diffusion_trainer.DiffusionTrainState,
                     tokenizer: vqgan_trainer.Tokenizer, unet: UNet3D, schedule: DiffusionSchedule,
                     mesh: Mesh, labels: np.ndarray, fps: np.ndarray, seed: int
                     ) -> Iterator[np.ndarray]:
  """uint8 videos ``[b, T, H, W, 3]`` for the given labels and FPS, one sampling batch at a time.

  The sampler compiles once; batch ``i`` draws its noise from ``fold_in(seed, i * batch)``, so a
  video depends only on the seed and its position. Streaming lets evaluation score thousands of
  videos without holding them all. On several processes every process passes the same labels and
  FPS and receives every video.
  """
  sample = config.diffusion.sample
  latent_shape = tokenizer_latent_shape(config)
  # Round the batch up to a multiple of the data-parallel devices; the extra videos are dropped.
  devices = sharding.data_parallel_size(mesh)
  batch_size = -(-sample.batch_size // devices) * devices
  split, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  params_sharding = jax.tree.map(lambda leaf: leaf.sharding, state.ema_params)  # as trained
  sample_fn = jax.jit(make_sample_fn(config, unet, schedule, latent_shape),
                      in_shardings=(params_sharding, split, split, replicated),
                      out_shardings=split)
  # Replicated output: on several processes a batch-split array cannot be read whole on one.
  unscale = jax.jit(latents_lib.from_model_space, out_shardings=replicated)
  for start in range(0, len(labels), batch_size):
    batch_labels = np.resize(labels[start:start + batch_size], batch_size)  # pad the last batch
    batch_fps = np.resize(fps[start:start + batch_size], batch_size)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), start)
    batch_labels, batch_fps = sharding.from_replicated_host_data((batch_labels, batch_fps), split)
    latents = sample_fn(state.ema_params, batch_labels, batch_fps,
                        sharding.from_replicated_host_data(rng, replicated))
    # Through the host: the tokenizer may live on another mesh than the sampler (it is small).
    unscaled = np.asarray(jax.device_get(unscale(latents, state.latent_shift, state.scale_factor)))
    decoded = tokenizer.decode_latents(unscaled)
    yield np.asarray(jax.device_get(decoded))[:len(labels) - start]


def generate(config: ml_collections.ConfigDict, state: diffusion_trainer.DiffusionTrainState,
             tokenizer: vqgan_trainer.Tokenizer, unet: UNet3D, schedule: DiffusionSchedule,
             mesh: Mesh, labels: np.ndarray, fps: np.ndarray, seed: int) -> np.ndarray:
  """uint8 videos ``[N, T, H, W, 3]`` for the given labels and FPS (:func:`generate_batches`)."""
  return np.concatenate(list(generate_batches(config, state, tokenizer, unet, schedule, mesh,
                                              labels, fps, seed)))


def tokenizer_latent_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """``(t, h, w, c)`` of one clip's latent."""
  return latent_shape(config)[1:]


def write_samples(config: ml_collections.ConfigDict, state, tokenizer, unet, schedule,
                  mesh: Mesh, out_dir: fileio.PathLike) -> epath.Path:
  """Generates ``sample.num_videos`` videos and writes MP4s, a GIF grid and samples.json."""
  out_dir = epath.Path(out_dir)
  sample = config.diffusion.sample
  labels = sample_labels(config, sample.num_videos)
  fps = np.full(sample.num_videos, sample.fps, np.float32)
  videos = generate(config, state, tokenizer, unet, schedule, mesh, labels, fps, sample.seed)
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, (video, label) in enumerate(zip(videos, labels)):
      video_io.write_mp4(out_dir / f"video_{index:03d}_class_{label}.mp4", video, sample.fps)
    columns = config.data.num_classes if config.diffusion.use_class and sample.label < 0 else 8
    grid = video_io.video_grid(videos, columns=max(1, min(columns, len(videos))))
    video_io.write_gif(out_dir / "grid.gif", grid, sample.fps)
    info = {"step": int(jax.device_get(state.step)), "num_videos": int(len(videos)),
            "labels": labels.tolist(), "fps": float(sample.fps),
            "guidance_scale": float(sample.guidance_scale), "sampler": sample.sampler,
            "num_steps": int(sample.num_steps), "eta": float(sample.eta), "seed": sample.seed,
            "tokenizer_step": tokenizer.step}
    (out_dir / "samples.json").write_text(json.dumps(info, indent=2) + "\n")
  logging.info("Wrote %d sampled videos to %s.", len(videos), out_dir)
  return out_dir


def restore_models(config: ml_collections.ConfigDict, workdir: fileio.PathLike,
                   devices: list | None = None
                   ) -> tuple[diffusion_trainer.DiffusionTrainState, vqgan_trainer.Tokenizer,
                              diffusion_trainer.DiffusionTrainer]:
  """The latest stage-2 state, its tokenizer and trainer; fails clearly if a stage has none.

  The state carries the EMA weights; the trainer the U-Net, the schedule and a mesh over
  ``devices`` (default: all).
  """
  tokenizer = vqgan_trainer.restore_tokenizer(config, workdir)
  trainer = diffusion_trainer.DiffusionTrainer(config, workdir, tokenizer_latent_shape(config),
                                               devices)
  state = trainer.restore()
  trainer.checkpointer.close()
  if state is None:
    raise FileNotFoundError(
        f"No stage-2 checkpoint in {trainer.checkpointer.directory}. Train one first: "
        f"python -m vqvdm_jax.main --config=... --workdir={workdir} --mode=train_diffusion")
  return state, tokenizer, trainer


def sample(config: ml_collections.ConfigDict, workdir: fileio.PathLike) -> epath.Path:
  """``--mode=sample``: the latest stage-2 checkpoint's EMA weights -> ``DIR/samples/``."""
  state, tokenizer, trainer = restore_models(config, workdir)
  return write_samples(config, state, tokenizer, trainer.unet, trainer.schedule, trainer.mesh,
                       epath.Path(workdir) / "samples")
