"""Sampling videos: noise -> DDPM/DDIM, guided (VQ-VDM eq. 9) -> unscale -> quantize -> decode.

The whole reverse process is one compiled loop; the sample batch is split over the mesh's batch
axes. :func:`write_samples` is what ``--mode=sample`` and the trainers' progress samples write:
``video_XXX_class_C.mp4`` per video, ``grid.gif`` (one column per video), ``videos.npz`` (the
exact uint8 videos and labels) and ``samples.json``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from vqvdm_jax import config as config_lib
from vqvdm_jax import fileio, row_random, sharding, video_io
from vqvdm_jax.data import latents as latents_lib
from vqvdm_jax.diffusion import samplers
from vqvdm_jax.diffusion.model import apply_unet, null_label
from vqvdm_jax.diffusion.schedule import DiffusionSchedule
from vqvdm_jax.models.unet3d import UNet3D
from vqvdm_jax.progress import Progress

PyTree = Any


def sampling_config(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose ``diffusion.sample`` fields take the given (non-None) values,
  validated like a command line's overrides."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    if value is None:
      continue
    if key not in config.diffusion.sample:
      raise TypeError(f"Unknown sampling setting {key!r}; the settings are the fields of "
                      f"config.diffusion.sample: {sorted(config.diffusion.sample.keys())}.")
    config.diffusion.sample[key] = tuple(value) if isinstance(value, list) else value
  config_lib.validate(config)
  return config


def sample_labels(config: ml_collections.ConfigDict, num_videos: int) -> np.ndarray:
  """The class of each video: ``sample.label``, or every class in turn when it is -1; zeros
  for an unconditional model."""
  label = config.diffusion.sample.label
  if not config.diffusion.use_class:
    return np.zeros(num_videos, np.int32)
  if label >= 0:
    return np.full(num_videos, label, np.int32)
  return (np.arange(num_videos) % config.data.num_classes).astype(np.int32)


def resolve_labels(config: ml_collections.ConfigDict, labels: Any = None) -> np.ndarray:
  """One class per video, checked: ``labels`` as given, or by default
  :func:`sample_labels` for ``sample.num_videos`` videos."""
  if labels is None:
    labels = sample_labels(config, config.diffusion.sample.num_videos)
  labels = np.asarray(labels, np.int32).reshape(-1)
  num_classes = config.data.num_classes if config.diffusion.use_class else 1
  if labels.size == 0 or labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must be classes in 0..{num_classes - 1}, got {labels.tolist()}.")
  return labels


def make_sample_fn(config: ml_collections.ConfigDict, unet: UNet3D, schedule: DiffusionSchedule,
                   latent_shape: tuple[int, ...]):
  """``sample_fn(params, labels [B], fps [B], keys [B]) -> scaled latents [B, t, h, w, c]`` with
  the sampler of ``config.diffusion.sample``; row ``b``'s noise comes from ``keys[b]`` alone."""
  apply_fn = apply_unet(unet, config)
  settings = config.diffusion.sample
  clip_x0 = settings.clip_x0 or None
  interval = tuple(settings.guidance_interval) if settings.guidance_interval else None

  def sample_fn(params, labels, fps, keys):
    model_fn = samplers.make_guided_model_fn(
        apply_fn, params, fps if config.diffusion.use_fps else None,
        labels if config.diffusion.use_class else None, null_label(config),
        settings.guidance_scale, interval)
    shape = (labels.shape[0], *latent_shape)
    if settings.sampler == "ddpm":
      return samplers.ddpm_sample(model_fn, schedule, shape, keys, config.diffusion.prediction,
                                  clip_x0, settings.num_steps)
    return samplers.ddim_sample(model_fn, schedule, shape, keys, settings.num_steps,
                                settings.eta, config.diffusion.prediction, clip_x0)

  return sample_fn


def compile_sampler(model, config: ml_collections.ConfigDict
                    ) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
  """``model``'s jitted sampler of ``config.diffusion.sample`` (:func:`make_sample_fn`) and the
  jitted map of its output back to the tokenizer's latent space."""
  split, replicated = sharding.batch_sharding(model.mesh), sharding.replicated(model.mesh)
  params_sharding = jax.tree.map(lambda leaf: leaf.sharding, model.params)
  sample_fn = jax.jit(make_sample_fn(config, model.unet, model.schedule, model.latent_shape),
                      in_shardings=(params_sharding, split, split, split), out_shardings=split)
  # Replicated output: on several processes a batch-split array cannot be read whole on one.
  return sample_fn, jax.jit(latents_lib.from_model_space, out_shardings=replicated)


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
  """``batch_size`` rounded up to a multiple of the mesh's data-parallel devices."""
  devices = sharding.data_parallel_size(mesh)
  return -(-batch_size // devices) * devices


def conditioning_batches(mesh: Mesh, labels: np.ndarray, fps: np.ndarray, seed: int,
                         batch_size: int) -> Iterator[tuple[int, jax.Array, jax.Array, jax.Array]]:
  """``(start, labels [b], fps [b], keys [b])`` of each sampling batch, placed on ``mesh`` and
  split over its batch axes; ``b`` is rounded up to the data-parallel devices (the last batch
  padded; callers drop what is past the end). Video ``i``'s key is ``fold_in(PRNGKey(seed), i)``
  (:func:`row_random.video_keys`), whatever batch it falls in."""
  batch_size = padded_batch_size(batch_size, mesh)
  split = sharding.batch_sharding(mesh)
  for start in range(0, len(labels), batch_size):
    batch_labels = np.resize(labels[start:start + batch_size], batch_size)  # pad the last batch
    batch_fps = np.resize(fps[start:start + batch_size], batch_size)
    keys = np.asarray(row_random.video_keys(seed, start, batch_size))  # padded rows: i >= N
    yield (start, *sharding.from_replicated_host_data((batch_labels, batch_fps, keys), split))


def generate_batches(model, labels: np.ndarray, fps: np.ndarray, seed: int,
                     config: ml_collections.ConfigDict | None = None) -> Iterator[np.ndarray]:
  """uint8 videos ``[b, T, H, W, 3]`` of a :class:`~vqvdm_jax.inference.VideoModel`, one
  sampling batch at a time, for the given labels and FPS.

  The sampler compiles once. Video ``i`` draws all its noise from its own key
  ``fold_in(PRNGKey(seed), i)``, so it depends only on the seed, its index, its label and FPS
  and the sampler settings: not on ``sample.batch_size``, the number of devices or the rows
  padded onto the last batch (up to float rounding, which may differ with the batch shape).
  Streaming lets evaluation score thousands of videos without holding them all. On several
  processes every process passes the same labels and FPS and receives every video. ``config``
  (default: the model's) sets the sampler.
  """
  config = model.config if config is None else config
  mesh = model.mesh
  sample_fn, unscale = model.sampler(config)
  for start, batch_labels, batch_fps, keys in conditioning_batches(
      mesh, labels, fps, seed, config.diffusion.sample.batch_size):
    latents = sample_fn(model.params, batch_labels, batch_fps, keys)
    # Through the host: the tokenizer may live on another mesh than the sampler (it is small).
    unscaled = np.asarray(jax.device_get(unscale(latents, model.latent_shift,
                                                 model.scale_factor)))
    decoded = model.tokenizer.decode_latents(unscaled)
    yield np.asarray(jax.device_get(decoded))[:len(labels) - start]


def write_samples(model, out_dir: fileio.PathLike,
                  config: ml_collections.ConfigDict | None = None) -> epath.Path:
  """Samples ``sample.num_videos`` videos with ``config.diffusion.sample`` (default: the
  model's config) and writes MP4s, a GIF grid and ``samples.json`` into ``out_dir``."""
  config = model.config if config is None else config
  sample = config.diffusion.sample
  labels = sample_labels(config, sample.num_videos)
  logging.info("Sampling %d videos: %s, %d steps, guidance scale %g, seed %d ...",
               sample.num_videos, sample.sampler, sample.num_steps, sample.guidance_scale,
               sample.seed)
  progress = Progress("Sampling (the first batch includes compiling)", sample.num_videos,
                      unit="videos")
  batches = []
  for batch in generate_batches(model, labels, np.full(sample.num_videos, sample.fps, np.float32),
                                sample.seed, config):
    batches.append(batch)
    progress.update(len(batch))
  videos = np.concatenate(batches)
  return write_videos(model, out_dir, videos, labels, config, {
      "guidance_scale": float(sample.guidance_scale), "sampler": sample.sampler,
      "num_steps": int(sample.num_steps), "eta": float(sample.eta),
      "guidance_interval": list(sample.guidance_interval), "clip_x0": float(sample.clip_x0)})


def write_videos(model, out_dir: fileio.PathLike, videos: np.ndarray, labels: np.ndarray,
                 config: ml_collections.ConfigDict, settings: dict[str, Any]) -> epath.Path:
  """What every stage-2 prior's ``--mode=sample`` writes: ``video_XXX_class_C.mp4``,
  ``grid.gif``, ``videos.npz`` and ``samples.json`` (with the sampler's ``settings``)."""
  sample = config.diffusion.sample
  out_dir = epath.Path(out_dir)
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, (video, label) in enumerate(zip(videos, labels)):
      video_io.write_mp4(out_dir / f"video_{index:03d}_class_{label}.mp4", video, sample.fps)
    columns = config.data.num_classes if config.diffusion.use_class and sample.label < 0 else 8
    grid = video_io.video_grid(videos, columns=max(1, min(columns, len(videos))))
    video_io.write_gif(out_dir / "grid.gif", grid, sample.fps)
    with (out_dir / "videos.npz").open("wb") as file:  # exact pixels: MP4 and GIF are lossy
      np.savez_compressed(file, videos=videos, labels=labels)
    info = {"step": model.step, "num_videos": int(len(videos)), "labels": labels.tolist(),
            "fps": float(sample.fps), **settings, "seed": sample.seed,
            "tokenizer_step": model.tokenizer.step}
    (out_dir / "samples.json").write_text(json.dumps(info, indent=2) + "\n")
  logging.info("Wrote %d sampled videos to %s.", len(videos), out_dir)
  return out_dir
