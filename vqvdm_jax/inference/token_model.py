"""A trained token prior (autoregressive or masked transformer) and its tokenizer, ready to sample.

::

  model = vqvdm_jax.load("DIR", config=...)        # config.stage2 = 'autoregressive' or 'masked'
  videos = model.sample(labels=[0, 1], guidance_scale=2.0, temperature=1.0, seed=0)
  future = model.continue_video(clips, prompt_frames=1)   # video prediction from latent frame 0

Loading reads the transformer's EMA weights and step from ``DIR/<stage2>/checkpoints`` and the
tokenizer from stage 1; sampling draws code indices and decodes them with the tokenizer. The
interface is :class:`~vqvdm_jax.inference.model.VideoModel`'s, so ``--mode=sample``,
``--mode=evaluate`` and the benchmarks treat every prior alike.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from vqvdm_jax import checkpointing, fileio, row_random, runtime, sharding
from vqvdm_jax import config as config_lib
from vqvdm_jax import workdir as workdir_lib
from vqvdm_jax.diffusion.model import null_label
from vqvdm_jax.inference import sampling
from vqvdm_jax.inference.tokenizer import Tokenizer, load_tokenizer, resolve_config
from vqvdm_jax.priors import autoregressive, masked
from vqvdm_jax.priors import model as prior_model

PyTree = Any


def token_sampling_config(config: ml_collections.ConfigDict, **overrides
                          ) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the given (non-None) sampling settings: the fields of
  ``transformer.sample`` (guidance_scale, temperature, top_k, top_p, num_steps, ...) and the
  shared ones of ``diffusion.sample`` (label, fps, num_videos, batch_size, seed); validated."""
  config = copy.deepcopy(config)
  shared = ("label", "fps", "num_videos", "batch_size", "seed")
  for key, value in overrides.items():
    if value is None:
      continue
    if key in config.transformer.sample:
      config.transformer.sample[key] = value
    elif key in shared:
      config.diffusion.sample[key] = value
    else:
      raise TypeError(f"Unknown sampling setting {key!r}; the settings are "
                      f"{sorted([*config.transformer.sample.keys(), *shared])}.")
  config_lib.validate(config)
  return config


def make_sample_fn(config: ml_collections.ConfigDict, num_prompt_codes: int = 0):
  """``sample_fn(params, labels [B], fps [B], keys [B], prompt [B, L]) -> codes [B, t', h, w]``
  with the prior and settings of ``config`` (``transformer.sample``); ``t'`` is
  ``num_latent_frames`` (0: the trained ``t``), reached by a sliding window beyond ``t``. Two
  levels: ``{'top': [B, t', h', w'], 'bottom': [B, t, h, w]}``, the top drawn first."""
  settings = config.transformer.sample
  common = {"null": null_label(config), "guidance_scale": float(settings.guidance_scale),
            "temperature": float(settings.temperature), "num_prompt_codes": num_prompt_codes}
  if config.stage2 == "autoregressive":
    model = prior_model.make_transformer(config, decode=True)
    draw = functools.partial(autoregressive.sample, model, top_k=int(settings.top_k),
                             top_p=float(settings.top_p), **common)
  else:
    model = prior_model.make_transformer(config)
    draw = functools.partial(masked.sample, model, num_steps=int(settings.num_steps),
                             choice_temperature=float(settings.choice_temperature), **common)

  grid = prior_model.token_grid(config)
  num_frames = int(settings.num_latent_frames) or grid[0]
  window_prompt = (grid[0] - 1) * grid[1] * grid[2]
  if num_frames > grid[0]:  # windows after the first are drawn with their first t - 1 frames given
    draw_next = functools.partial(draw.func, *draw.args,
                                  **{**draw.keywords, "num_prompt_codes": window_prompt})

  def sample_fn(params, labels, fps, keys, prompt):
    labels = prior_model.conditioning_labels(config, labels)
    codes = draw(params, labels, fps, keys, prompt=prompt)  # [B, L]: t·h·w (+ the top's)
    if prior_model.num_levels(config) == 2:  # no window: config.validate allows none
      return prior_model.unflatten_levels(codes, config)  # {'top', 'bottom'}
    codes = codes.reshape(codes.shape[0], *grid)
    if num_frames > grid[0]:
      codes = prior_model.extend_by_sliding_window(
          lambda window, index: draw_next(params, labels, fps, row_random.fold_in(keys, index),
                                          prompt=window), codes, num_frames)
    return codes  # [B, frames, h, w]

  return sample_fn


class TokenModel:
  """A trained tokenizer and token-prior transformer (its EMA weights), on a device mesh."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer, params: PyTree,
               step: int, mesh: Mesh):
    self.config, self.tokenizer, self.params, self.step, self.mesh = (
        config, tokenizer, params, step, mesh)
    self.grid = prior_model.token_grid(config)  # (t, h, w)
    self._sample_fns: dict[tuple, Any] = {}

  def sample(self, labels: Sequence[int] | int | None = None, fps: float | None = None,
             seed: int | None = None, num_videos: int | None = None, **settings) -> np.ndarray:
    """uint8 videos ``[N, T, H, W, 3]``; ``labels`` as for ``VideoModel.sample``. Other
    settings (``guidance_scale``, ``temperature``, ``top_k``, ``top_p``, ``num_steps``,
    ``choice_temperature``) default to ``config.transformer.sample``. Same seed, same videos."""
    one_class = labels is not None and np.ndim(labels) == 0
    config = token_sampling_config(self.config, label=int(labels) if one_class else None,
                                   fps=fps, seed=seed, num_videos=num_videos, **settings)
    labels = sampling.resolve_labels(config, None if one_class else labels)
    sample = config.diffusion.sample
    return np.concatenate(list(self.generate_batches(
        labels, np.full(len(labels), sample.fps, np.float32), sample.seed, config)))

  def continue_video(self, videos: np.ndarray, prompt_frames: int = 1,
                     labels: Sequence[int] | None = None, fps: float | None = None,
                     seed: int | None = None, **settings) -> np.ndarray:
    """Video prediction: uint8 ``videos [N, T, H, W, 3]`` are encoded, the codes of their first
    ``prompt_frames`` latent frames are kept and the rest generated; returns uint8 videos."""
    config = token_sampling_config(self.config, fps=fps, seed=seed,
                                   prompt_frames=prompt_frames, **settings)
    prompt = self.tokenizer.encode_to_indices(videos)
    labels = sampling.resolve_labels(config, np.zeros(len(videos), np.int32)
                                     if labels is None else labels)
    sample = config.diffusion.sample
    return np.concatenate(list(self.generate_batches(
        labels, np.full(len(labels), sample.fps, np.float32), sample.seed, config, prompt)))

  def sample_codes(self, labels: np.ndarray, fps: np.ndarray, seed: int,
                   config: ml_collections.ConfigDict | None = None,
                   prompt: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Code indices ``[b, t, h, w]`` (two levels: ``{'top', 'bottom'}`` indices, as the
    tokenizer's ``encode_to_indices``) one sampling batch at a time; video ``i``'s codes are drawn
    from its own key ``fold_in(PRNGKey(seed), i)``, whatever the batch size, devices or padding
    (:func:`sampling.conditioning_batches`). ``prompt [N, t, h, w]`` supplies the first
    ``transformer.sample.prompt_frames`` latent frames of each video."""
    config = self.config if config is None else config
    num_prompt_codes = int(config.transformer.sample.prompt_frames) * self.grid[1] * self.grid[2]
    if num_prompt_codes and prompt is None:
      raise ValueError("transformer.sample.prompt_frames > 0 needs prompt codes; use "
                       "continue_video(videos, prompt_frames=...).")
    length = prior_model.sequence_length(config)
    prompt = (np.zeros((len(labels), length), np.int32) if prompt is None
              else np.asarray(prompt, np.int32).reshape(len(labels), length))
    split = sharding.batch_sharding(self.mesh)
    sample_fn = self._sample_fn(config, num_prompt_codes)
    batch_size = sampling.padded_batch_size(config.diffusion.sample.batch_size, self.mesh)
    for start, batch_labels, batch_fps, keys in sampling.conditioning_batches(
        self.mesh, labels, fps, seed, config.diffusion.sample.batch_size):
      batch_prompt = sharding.from_replicated_host_data(
          np.resize(prompt[start:start + batch_size], (batch_size, length)), split)
      codes = sample_fn(self.params, batch_labels, batch_fps, keys, batch_prompt)
      yield jax.tree.map(lambda level: np.asarray(level)[:len(labels) - start],
                         jax.device_get(codes))

  def _sample_fn(self, config: ml_collections.ConfigDict, num_prompt_codes: int):
    """The jitted sampler of these settings, compiled once per model and settings."""
    key = (config.stage2, json.dumps(config.transformer.sample.to_dict(), sort_keys=True),
           num_prompt_codes)
    if key not in self._sample_fns:
      split, replicated = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)
      params_sharding = jax.tree.map(lambda leaf: leaf.sharding, self.params)
      self._sample_fns[key] = jax.jit(
          make_sample_fn(config, num_prompt_codes),
          in_shardings=(params_sharding, split, split, split, split),
          out_shardings=replicated)
    return self._sample_fns[key]

  def generate_batches(self, labels: np.ndarray, fps: np.ndarray, seed: int,
                       config: ml_collections.ConfigDict | None = None,
                       prompt: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """uint8 videos ``[b, T, H, W, 3]``, one sampling batch at a time: codes, then the
    tokenizer's decoder."""
    for codes in self.sample_codes(labels, fps, seed, config, prompt):
      yield self.tokenizer.decode(codes)

  def sampling_settings(self, config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """How this model samples, for results files."""
    settings = (self.config if config is None else config).transformer.sample
    return {"prior": self.config.stage2, **settings.to_dict()}

  def write_samples(self, out_dir: fileio.PathLike, **settings) -> epath.Path:
    """``--mode=sample``'s output (MP4s, grid.gif, videos.npz, samples.json)."""
    config = token_sampling_config(self.config, **settings)
    sample = config.diffusion.sample
    labels = sampling.sample_labels(config, sample.num_videos)
    logging.info("Sampling %d videos with the %s prior, guidance scale %g, seed %d ...",
                 sample.num_videos, config.stage2, config.transformer.sample.guidance_scale,
                 sample.seed)
    videos = np.concatenate(list(self.generate_batches(
        labels, np.full(len(labels), sample.fps, np.float32), sample.seed, config)))
    return sampling.write_videos(self, out_dir, videos, labels, config,
                                 self.sampling_settings(config))


def load_token_model(workdir: fileio.PathLike, step: int | None = None,
                     config: ml_collections.ConfigDict | None = None,
                     devices: list | None = None,
                     tokenizer_step: int | None = None) -> TokenModel:
  """The trained ``config.stage2`` prior of ``workdir`` (arguments as :func:`load`'s)."""
  runtime.configure_jax()
  config = resolve_config(workdir, config)
  mesh = sharding.make_mesh(config.mesh, devices)
  abstract_params = prior_model.abstract_transformer_params(config)
  wanted = {"ema_params": abstract_params, "step": jax.ShapeDtypeStruct((), jnp.int32),
            "tokenizer_step": jax.ShapeDtypeStruct((), jnp.int32)}
  shardings = sharding.state_shardings(wanted, mesh, config.mesh.param_sharding,
                                       config.mesh.fsdp_min_size)
  directory = workdir_lib.stage2_dir(workdir, config.stage2) / "checkpoints"
  restored = checkpointing.restore_fields(
      directory, sharding.abstract_with_shardings(wanted, shardings), step)
  if restored is None:
    raise config_lib.MissingCheckpointError(
        f"{workdir} has no {config.stage2} checkpoint (in {directory}); train it first: "
        f"python -m vqvdm_jax.main --workdir={workdir} --mode=train_prior "
        f"--config.stage2={config.stage2}")
  fields, step = restored
  tokenizer = load_tokenizer(workdir, tokenizer_step, config, devices,
                             trained_on=int(fields["tokenizer_step"]))
  return TokenModel(config, tokenizer, fields["ema_params"], step, mesh)

