"""Grain input pipelines: an endless, shuffled, checkpointable train stream and fixed eval batches.

Batches are dicts of numpy arrays, channel-last:
``video`` uint8 ``[B, T, H, W, 3]``, ``label`` int32 ``[B]``, ``fps`` float32 ``[B]``.
Videos stay uint8 on the host (4x less to copy and transfer); the model converts them on device
with :func:`to_model_input` inside its jitted step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from vqvdm_jax.data import real, synthetic


def _read_options(data_config: Any) -> grain.ReadOptions:
  """Background threads read ``prefetch_buffer_size`` batches ahead (0 turns prefetching off).

  One thread per buffered batch: the clips are rendered in memory, so more threads than that
  would only contend for the GIL.
  """
  buffer_size = int(data_config.prefetch_buffer_size)
  return grain.ReadOptions(num_threads=buffer_size, prefetch_buffer_size=buffer_size)


def per_process_batch_size(batch_size: int) -> int:
  """The share of the global batch that this host loads; every host loads an equal share."""
  process_count = jax.process_count()
  if batch_size % process_count:
    raise ValueError(
        f"Global batch size {batch_size} is not divisible by the number of processes "
        f"({process_count}); every host must load the same number of clips. Pick a batch size "
        f"that is a multiple of {process_count}.")
  return batch_size // process_count


def train_iterator(data_config: Any, batch_size: int, seed: int) -> grain.DatasetIterator:
  """The endless training stream for this process, reshuffled every epoch.

  Each process reads a disjoint shard (every ``process_count``-th clip) and yields its share of
  the global ``batch_size``. Batches never straddle a short remainder: the stream repeats before
  batching, so consecutive epochs run into each other and every batch is full.

  The returned iterator is checkpointable: ``it.get_state()`` / ``it.set_state(state)``, or
  ``grain.checkpoint.CheckpointSave(it)`` beside the train state in Orbax, resumes exactly.
  """
  local_batch_size = per_process_batch_size(batch_size)
  source = make_source(data_config, "train", seed)
  dataset = grain.MapDataset.source(source)
  dataset = dataset[jax.process_index()::jax.process_count()]
  if len(dataset) == 0:
    raise ValueError(
        f"The train split's {len(source)} {_split_size_hint(data_config, 'train')} leave "
        f"process {jax.process_index()} of {jax.process_count()} without clips; use at least "
        f"one clip per process.")
  # Clips are sampled after `repeat`, so each epoch draws new random clips from every video.
  dataset = _to_clips(dataset.shuffle(seed=seed).repeat(), data_config, seed)
  dataset = dataset.batch(local_batch_size, drop_remainder=True)
  stream = dataset.to_iter_dataset(_read_options(data_config))
  if data_config.num_workers > 0:
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.num_workers,
        per_worker_buffer_size=max(1, data_config.prefetch_buffer_size)))
  return iter(stream)


def eval_batches(data_config: Any, batch_size: int, num_clips: int,
                 seed: int) -> Iterator[dict[str, np.ndarray]]:
  """The first ``num_clips`` clips of the 'eval' split, in order, in batches; one pass.

  Deterministic (no shuffle), so every evaluation sees the same clips and metrics are comparable
  across runs. The last batch is kept even when partial (it holds ``num_clips % batch_size``
  clips): metrics then cover exactly ``num_clips`` clips, and callers that need a fixed shape
  (e.g. for jit) pad it themselves. Every process reads the same clips; it is not sharded.
  """
  return ordered_batches(data_config, "eval", batch_size, num_clips, seed)


def ordered_batches(data_config: Any, split: str, batch_size: int, num_clips: int | None,
                    seed: int) -> Iterator[dict[str, np.ndarray]]:
  """``num_clips`` (None: all) clips of ``split`` in a fixed order, in batches; one pass.

  Synthetic clips come in index order; real videos in a permutation fixed by ``seed``, so that
  a subset (an FVD reference of 2,048 UCF-101 videos, say) covers every class.
  """
  source = make_source(data_config, split, seed)
  num_clips = len(source) if num_clips is None else num_clips
  if not 1 <= num_clips <= len(source):
    raise ValueError(
        f"Asked for {num_clips} {split} clips but the split has {len(source)} "
        f"{_split_size_hint(data_config, split)}; ask for between 1 and {len(source)} clips.")
  if batch_size < 1:
    raise ValueError(f"Eval batch size must be >= 1, got {batch_size}.")
  dataset = grain.MapDataset.source(source)
  if data_config.name != "synthetic":
    # Real splits are stored in a fixed order (UCF-101's by class): the first N videos of a
    # seeded permutation are a fair sample of the split, and the same sample on every call.
    dataset = dataset.shuffle(seed=seed)
  # Real data: one seeded clip per video, the same on every call (the rng is the seed's and the
  # position's), so evaluations stay comparable.
  dataset = _to_clips(dataset[:num_clips], data_config, seed)
  dataset = dataset.batch(batch_size, drop_remainder=False)
  return iter(dataset.to_iter_dataset(_read_options(data_config)))


def make_source(data_config: Any, split: str, seed: int) -> Any:
  """The random-access source of ``split`` ('train' or 'eval') that ``config.data.name`` names.

  Synthetic elements are clips already; real datasets' elements are whole encoded videos that
  :func:`_to_clips` cuts clips from.
  """
  if data_config.name == "synthetic":
    return synthetic.make_source(data_config, split, seed)
  if data_config.name in real.DATASETS:
    return real.make_source(data_config, split)
  raise ValueError(f"config.data.name={data_config.name!r} is not one of "
                   f"{('synthetic',) + real.DATASETS}.")


def _to_clips(dataset: grain.MapDataset, data_config: Any, seed: int) -> grain.MapDataset:
  if data_config.name == "synthetic":
    return dataset
  return dataset.random_map(real.clip_sampler(data_config), seed=seed)


def _split_size_hint(data_config: Any, split: str) -> str:
  """What sets a split's size, for error messages."""
  if data_config.name == "synthetic":
    field = "num_eval_clips" if split == "eval" else "num_train_clips"
    return f"clips (config.data.{field})"
  return f"videos (of the prepared {data_config.name} in config.data.data_dir)"


def to_model_input(video: Any) -> Any:
  """uint8 pixels in [0, 255] -> float32 in [-1, 1], the range the VQGAN and diffusion model see.

  Works on numpy and jax arrays alike, inside or outside ``jit``.
  """
  return video.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(video: Any) -> Any:
  """The inverse of :func:`to_model_input`: clip to [-1, 1], rescale and round to uint8.

  Clipping first matters: decoder outputs overshoot [-1, 1], and a cast would wrap them around.
  """
  return ((video.clip(-1.0, 1.0) + 1.0) * 127.5).round().astype(jnp.uint8)
