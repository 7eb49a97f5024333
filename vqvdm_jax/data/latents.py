"""The stage-2 training data: stage-1 latents of the train split, encoded once and cached.

Stage 2 never runs the tokenizer's encoder in its train step. The first stage-2 start encodes
the train split with the tokenizer checkpoint it finds and writes
``DIR/diffusion/latents/tokenizer_<step>/`` (``latents.npy [N, t, h, w, c]``, ``labels.npy``,
``fps.npy``, ``meta.json``). The folder is written under a temporary name and renamed when
complete, so an interrupted encode never leaves a cache that looks finished. A new tokenizer
checkpoint gets a new folder; an existing one is reused. On a gs:// workdir the arrays are read
into memory (a local cache is memory-mapped).

The scale factor (latent-diffusion's ``scale_by_std``) is 1 / std of the cached latents over the
first ``diffusion.latents.scale_estimate_clips`` clips, so the diffusion model sees unit-variance
latents whatever the tokenizer's scale. With ``diffusion.latents.center`` the per-channel mean of
the same clips is subtracted first (``normalization``); both are fixed when stage 2 starts and
stored in its checkpoint.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from vqvdm_jax import fileio
from vqvdm_jax.data import pipeline


class LatentCache:
  """Random-access view of a finished cache folder: ``cache[i] -> {latent, label, fps}``."""

  def __init__(self, directory: fileio.PathLike):
    self.directory = epath.Path(directory)
    meta_path = self.directory / "meta.json"
    if not meta_path.exists():
      raise FileNotFoundError(f"{self.directory} is not a finished latent cache (no meta.json).")
    self.meta = json.loads(meta_path.read_text())
    self.latents = fileio.load_numpy(self.directory / "latents.npy", mmap_mode="r")
    self.labels = fileio.load_numpy(self.directory / "labels.npy")
    self.fps = fileio.load_numpy(self.directory / "fps.npy")

  @property
  def latent_shape(self) -> tuple[int, ...]:
    return tuple(self.latents.shape[1:])

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"latent": np.asarray(self.latents[index]),
            "label": self.labels[index], "fps": self.fps[index]}


def cache_directory(workdir: fileio.PathLike, tokenizer_step: int) -> epath.Path:
  return epath.Path(workdir) / "diffusion" / "latents" / f"tokenizer_{tokenizer_step:07d}"


def scale_factor(latents: np.ndarray) -> float:
  """latent-diffusion's scale_by_std: 1 / std, so the scaled latents have unit variance."""
  std = float(np.std(np.asarray(latents, np.float64)))
  if not np.isfinite(std) or std <= 0:
    raise ValueError(f"Cached latents have std {std}; the tokenizer checkpoint looks broken.")
  return 1.0 / std


def normalization(latents: np.ndarray, center: bool) -> tuple[np.ndarray, float]:
  """(shift [c], scale): stage 2 trains on ``(latent - shift) * scale`` and samples map back by
  ``z / scale + shift``. ``center=False`` is scale_by_std alone (shift 0). ``center=True`` also
  removes the per-channel mean, which an ε-model otherwise learns only from its small
  high-noise loss (on the demo that alone did not make ε work; benchmarks/RESULTS.md)."""
  latents = np.asarray(latents, np.float64)
  channels = latents.shape[-1]
  shift = (latents.reshape(-1, channels).mean(axis=0) if center else np.zeros(channels))
  return shift.astype(np.float32), scale_factor(latents - shift)


def to_model_space(latents: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """What the diffusion model sees: ``(latent - shift) * scale``, channel-last."""
  return (latents - shift) * scale


def from_model_space(z: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """Inverse of ``to_model_space``: sampled ``z`` back to the tokenizer's latent space."""
  return z / scale + shift


def build_or_load(config: ml_collections.ConfigDict, workdir: fileio.PathLike, tokenizer_step: int,
                  encode_fn: Callable[[np.ndarray], np.ndarray],
                  directory: fileio.PathLike | None = None, source: str | None = None,
                  dtype: Any = np.float32) -> LatentCache:
  """The cache for ``tokenizer_step``, encoding the train split with ``encode_fn`` if needed.

  ``encode_fn(video_uint8 [B, T, H, W, 3]) -> latents [B, t, h, w, c]`` (float32 numpy). The
  token priors pass their own ``directory``, ``source='indices'`` and ``dtype=np.int32`` for
  code indices ``[B, t, h, w]`` (``data/tokens.py``).
  """
  directory = epath.Path(directory or cache_directory(workdir, tokenizer_step))
  if (directory / "meta.json").exists():
    logging.info("Stage 2: reusing the cache %s.", directory)
    return LatentCache(directory)
  latents_config = config.diffusion.latents
  source = source or latents_config.source
  logging.info("Stage 2: encoding the train split with tokenizer step %d into %s.",
               tokenizer_step, directory)
  latents, labels, fps = [], [], []
  for batch in pipeline.ordered_batches(config.data, "train", latents_config.encode_batch_size,
                                        None, config.seed):
    latents.append(np.asarray(encode_fn(batch["video"]), dtype))
    labels.append(np.asarray(batch["label"], np.int32))
    fps.append(np.asarray(batch["fps"], np.float32))
  latents = np.concatenate(latents)
  # The scale factor is not stored here: stage 2 computes it (and the shift) when it starts and
  # keeps it in its checkpoint, the one place sampling reads it from.
  meta = {"tokenizer_step": tokenizer_step, "source": source,
          "num_clips": int(len(latents)), "latent_shape": list(latents.shape[1:])}
  if jax.process_index() == 0:
    partial = directory.with_name(directory.name + ".partial")
    if partial.exists():  # left by an interrupted encode
      partial.rmtree()
    partial.mkdir(parents=True)
    fileio.save_npy(partial / "latents.npy", latents)
    fileio.save_npy(partial / "labels.npy", np.concatenate(labels))
    fileio.save_npy(partial / "fps.npy", np.concatenate(fps))
    (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    partial.rename(directory)
  logging.info("Stage 2: cached %d latents of shape %s.", len(latents), latents.shape[1:])
  return LatentCache(directory)


def train_iterator(cache: LatentCache, batch_size: int, seed: int) -> Any:
  """Endless shuffled batches of cached latents for this process; checkpointable like stage 1's."""
  local_batch_size = pipeline.per_process_batch_size(batch_size)
  dataset = grain.MapDataset.source(cache)[jax.process_index()::jax.process_count()]
  dataset = dataset.shuffle(seed=seed).repeat().batch(local_batch_size, drop_remainder=True)
  return iter(dataset.to_iter_dataset())
