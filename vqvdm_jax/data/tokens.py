"""The token priors' training data: the stage-1 code indices of the train split, cached once.

The same machinery as the diffusion latents (:mod:`vqvdm_jax.data.latents`): the first start
encodes the train split with the tokenizer checkpoint it finds into
``DIR/tokens/tokenizer_<step>/`` (``latents.npy`` holds int32 codes ``[N, t, h, w]``), written
under a temporary name and renamed when complete. Both token priors read the same cache.

A two-level tokenizer's cache holds both levels as the sequence the prior reads: ``latents.npy``
is ``[N, L_top + L_bottom]``, each clip's top codes in raster order, then its bottom codes
(:func:`flatten_levels`; ``priors.model.unflatten_levels`` gives the two grids back).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from vqvdm_jax import fileio
from vqvdm_jax import workdir as workdir_lib
from vqvdm_jax.data import latents as latents_lib


class TokenCache(latents_lib.LatentCache):
  """Random-access view of a finished cache: ``cache[i] -> {codes [t, h, w], label, fps}``
  (two levels: ``codes [L_top + L_bottom]``)."""

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"codes": np.asarray(self.latents[index], np.int32), "label": self.labels[index],
            "fps": self.fps[index]}


def flatten_levels(indices: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
  """The tokenizer's code indices -> what the prior and the token cache hold: one level's
  ``[B, t, h, w]`` as they are; two levels' ``{'top', 'bottom'}`` as the sequence
  ``[B, L_top + L_bottom]``, each level raster-ordered, the top first (VQ-VAE-2 Algorithm 2)."""
  if not isinstance(indices, dict):
    return indices
  batch = len(indices["bottom"])
  return np.concatenate([np.asarray(indices["top"]).reshape(batch, -1),
                         np.asarray(indices["bottom"]).reshape(batch, -1)], axis=1)


def cache_directory(workdir: fileio.PathLike, tokenizer_step: int) -> epath.Path:
  return workdir_lib.tokens_dir(workdir) / f"tokenizer_{tokenizer_step:07d}"


def build_or_load(config: ml_collections.ConfigDict, workdir: fileio.PathLike,
                  tokenizer_step: int, encode_fn: Callable[[np.ndarray], np.ndarray]
                  ) -> TokenCache:
  """The code cache of ``tokenizer_step``; ``encode_fn(video_uint8) -> indices [B, t, h, w]``
  (the tokenizer's ``encode_to_indices``; two levels: its dict, cached flattened)."""
  directory = cache_directory(workdir, tokenizer_step)
  latents_lib.build_or_load(config, workdir, tokenizer_step,
                            lambda videos: flatten_levels(encode_fn(videos)),
                            directory=directory, source="indices", dtype=np.int32)
  return TokenCache(directory)


def train_iterator(cache: TokenCache, batch_size: int, seed: int) -> Any:
  """Endless shuffled, checkpointable batches of codes (as for the diffusion latents)."""
  return latents_lib.train_iterator(cache, batch_size, seed)
