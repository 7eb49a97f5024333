"""Batched, sharded feature extraction (I3D logits, C3D probabilities) over the device mesh.

One jitted call per batch of uint8 clips: the batch is split over the mesh's ``data`` axis, the
network's variables are replicated. Callers hand in any number of clips; the last batch is
padded (with copies of its last clip) and the padding dropped from the result.

On several processes, every process hands in the same clips and gets every clip's features
back: each places its devices' slices of the batch, and the features come out replicated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from vqvdm_jax import sharding
from vqvdm_jax.evaluation import i3d

PyTree = Any

# XLA's default optimisation level. The feature networks are frozen and run on many clips, so
# they are compiled at it even where XLA_FLAGS lower it for fast compiles (the tests run at 0):
# I3D on 4 clips on the CPU then compiles in 14 s and runs in 9 s of CPU, against 23 s and 20 s
# at level 0 (benchmarks/RESULTS.md, "Test suite"). Only the level: the tests also turn off
# XLA:CPU's fusion emitters, an escape-hatch option a future jaxlib may not know, so the package
# never names it (I3D compiles ~15 % slower at level 3 in the tests for that).
_FULL_OPTIMIZATION = {"xla_backend_optimization_level": 3}


class FeatureExtractor:
  """``extractor(uint8 clips [N, T, H, W, 3]) -> float32 features [N, D]`` (numpy, on the host).

  ``fn(variables, uint8 clips [B, ...]) -> [B, D]`` compiles once for the batch size, which is
  rounded up to a multiple of the data-parallel devices.
  """

  def __init__(self, fn: Callable[[PyTree, jax.Array], jax.Array], variables: PyTree,
               mesh: Mesh, batch_size: int):
    devices = sharding.data_parallel_size(mesh)
    self.batch_size = -(-batch_size // devices) * devices
    replicated = sharding.replicated(mesh)
    self._batch_sharding = sharding.batch_sharding(mesh)
    self.variables = sharding.from_replicated_host_data(variables, replicated)
    self._fn = jax.jit(fn, in_shardings=(replicated, self._batch_sharding),
                       out_shardings=replicated,
                       compiler_options=_FULL_OPTIMIZATION if jax.default_backend() == "cpu"
                       else None)

  def __call__(self, videos: np.ndarray) -> np.ndarray:
    videos = np.asarray(videos)
    outputs = []
    for start in range(0, len(videos), self.batch_size):
      chunk = videos[start:start + self.batch_size]
      padding = self.batch_size - len(chunk)
      if padding:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], padding, axis=0)])
      chunk = sharding.from_replicated_host_data(chunk, self._batch_sharding)
      features = np.asarray(jax.device_get(self._fn(self.variables, chunk)), np.float32)
      outputs.append(features[:len(features) - padding])
    return np.concatenate(outputs)


@functools.lru_cache(maxsize=4)
def i3d_extractor(mesh: Mesh, batch_size: int) -> FeatureExtractor:
  """The I3D logits extractor for a mesh, built (and compiled) once per process."""
  return FeatureExtractor(i3d.logits, i3d.load_variables(), mesh, batch_size)
