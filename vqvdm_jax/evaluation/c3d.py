"""C3D (Tran et al. 2015) in Flax linen: the classifier behind the video Inception Score.

The Inception Score of TGAN, TGANv2, DIGAN, TATS and VQ-VDM uses C3D trained on Sports-1M and
fine-tuned on UCF-101 (101 classes). Those weights cannot be installed offline, so they are read
from a file the user names in ``config.evaluation.c3d_weights``; without it the score is skipped
(and says so), never approximated with another network.

Weights file format (``.npz``, channel-last, float32):

- ``conv1a/kernel`` ``[3, 3, 3, 3, 64]`` (T, H, W, C_in, C_out; input channels **RGB**),
  ``conv1a/bias`` ``[64]``, and likewise ``conv2a``, ``conv3a``, ``conv3b``, ``conv4a``,
  ``conv4b``, ``conv5a``, ``conv5b`` (widths 128, 256, 256, 512, 512, 512, 512);
- ``fc6/kernel`` ``[8192, 4096]``, its inputs in the (T, H, W, C) order of the ``[1, 4, 4, 512]``
  pool5 output; ``fc7/kernel`` ``[4096, 4096]``; ``fc8/kernel`` ``[4096, K]``; their ``bias``;
- ``mean``: the training mean clip in 0..255 RGB, ``[16, 128, 171, 3]`` (or anything that
  broadcasts to it, e.g. ``[3]``), subtracted before the centre crop.

Converting the commonly used UCF-101 fine-tuned checkpoint (Caffe ``c3d_ucf101_finetune``, or its
Chainer export ``conv3d_deepnetA_ucf.npz`` used by TGAN's evaluation code): those arrays are
channel-first and the network read BGR. :func:`from_channel_first` does the conversion: kernels
``[C_out, C_in, T, H, W]`` -> ``[T, H, W, C_in, C_out]`` (conv1a's input channels reversed
BGR -> RGB), linear weights ``[out, in]`` -> ``[in, out]``, fc6's inputs reordered from
(C, T, H, W) to (T, H, W, C), the mean ``[3, 16, 128, 171]`` -> ``[16, 128, 171, 3]`` RGB::

  python -c "import numpy as np; from vqvdm_jax.evaluation import c3d; \
    np.savez('c3d_ucf101.npz', **c3d.from_channel_first(dict(np.load('conv3d_deepnetA_ucf.npz'))))"

The conversion is checked on random weights against a channel-first forward pass in the tests,
not against the real checkpoint (which is not available offline).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vqvdm_jax import fileio

PyTree = Any

CONV_LAYERS = ("conv1a", "conv2a", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")
FC_LAYERS = ("fc6", "fc7", "fc8")
NUM_FRAMES = 16
RESIZE = (128, 171)  # frames are resized to this, the mean subtracted, then centre-cropped.
CROP = 112
PROTOCOL = {
    "classifier": "C3D (Tran et al. 2015), Sports-1M pretrained, UCF-101 fine-tuned, from "
                  "config.evaluation.c3d_weights",
    "frames": NUM_FRAMES,
    "resize": f"bilinear to {RESIZE[0]}x{RESIZE[1]} (no antialiasing), minus the weights' mean "
              f"clip, centre crop {CROP}x{CROP}, values in 0..255 RGB",
    "score": "exp(E_x KL(p(y|x) || p(y))), mean and std over splits",
}
_PRECISION = jax.lax.Precision.HIGHEST
# pool1 keeps time; pools 2-5 halve it. pool5 pads the right/bottom edge (Caffe's ceil mode):
# 7x7 -> 4x4, so fc6 sees 1 x 4 x 4 x 512 = 8192 inputs.
_POOLS = {"conv1a": ((1, 2, 2), ((0, 0), (0, 0), (0, 0))),
          "conv2a": ((2, 2, 2), ((0, 0), (0, 0), (0, 0))),
          "conv3b": ((2, 2, 2), ((0, 0), (0, 0), (0, 0))),
          "conv4b": ((2, 2, 2), ((0, 0), (0, 0), (0, 0))),
          "conv5b": ((2, 2, 2), ((0, 0), (0, 1), (0, 1)))}


class C3D(nn.Module):
  """``clip [B, 16, 112, 112, 3]`` (mean-subtracted 0..255 RGB) -> class logits ``[B, K]``."""

  widths: tuple[int, ...] = (64, 128, 256, 256, 512, 512, 512, 512)
  fc_width: int = 4096
  num_classes: int = 101

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for name, width in zip(CONV_LAYERS, self.widths, strict=True):
      x = nn.relu(nn.Conv(width, (3, 3, 3), padding="SAME", precision=_PRECISION, name=name)(x))
      if name in _POOLS:
        window, padding = _POOLS[name]
        x = nn.max_pool(x, window, window, padding=padding)
    x = x.reshape((x.shape[0], -1))  # (T, H, W, C) order
    x = nn.relu(nn.Dense(self.fc_width, precision=_PRECISION, name="fc6")(x))
    x = nn.relu(nn.Dense(self.fc_width, precision=_PRECISION, name="fc7")(x))
    return nn.Dense(self.num_classes, precision=_PRECISION, name="fc8")(x)


def load(path: fileio.PathLike) -> tuple[C3D, PyTree]:
  """``(module, variables)`` from a weights file in this module's format; fails naming the key.

  The file may be local or on Cloud Storage (gs://).
  """
  path = epath.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"config.evaluation.c3d_weights={str(path)!r} does not exist; see "
                            f"vqvdm_jax/evaluation/c3d.py for the format and how to convert one.")
  with fileio.load_numpy(path) as file:
    arrays = {key: np.asarray(file[key], np.float32) for key in file.files}
  expected = [f"{layer}/{part}" for layer in CONV_LAYERS + FC_LAYERS for part in ("kernel", "bias")]
  missing = [key for key in expected + ["mean"] if key not in arrays]
  if missing:
    raise ValueError(f"C3D weights {path} lack {missing}; expected the keys of "
                     f"vqvdm_jax/evaluation/c3d.py's format (convert with from_channel_first).")
  module = C3D(widths=tuple(arrays[f"{layer}/kernel"].shape[-1] for layer in CONV_LAYERS),
               fc_width=arrays["fc6/kernel"].shape[-1],
               num_classes=arrays["fc8/kernel"].shape[-1])
  params = {layer: {"kernel": arrays[f"{layer}/kernel"], "bias": arrays[f"{layer}/bias"]}
            for layer in CONV_LAYERS + FC_LAYERS}
  mean = np.broadcast_to(arrays["mean"], (NUM_FRAMES, *RESIZE, 3)).astype(np.float32)
  return module, {"params": params, "mean": mean}


def preprocess(video_uint8: jax.Array, mean: jax.Array) -> jax.Array:
  """uint8 ``[B, T, H, W, 3]`` -> C3D input ``[B, 16, 112, 112, 3]``: resize, minus mean, crop."""
  batch, frames = video_uint8.shape[:2]
  if frames >= NUM_FRAMES:
    video = video_uint8[:, :NUM_FRAMES]
  else:  # as for I3D: repeat frames (nearest-neighbour in time), recorded as a deviation.
    video = video_uint8[:, (np.arange(NUM_FRAMES) * frames) // NUM_FRAMES]
  video = jax.image.resize(video.astype(jnp.float32), (batch, NUM_FRAMES, *RESIZE, 3),
                           "bilinear", antialias=False, precision=_PRECISION)
  video = video - mean
  top, left = (RESIZE[0] - CROP) // 2, (RESIZE[1] - CROP) // 2
  return video[:, :, top:top + CROP, left:left + CROP]


def make_probabilities_fn(module: C3D):
  """``fn(variables, uint8 clips) -> p(y|x) [B, K]``, to be jitted."""

  def probabilities(variables: PyTree, video_uint8: jax.Array) -> jax.Array:
    clip = preprocess(video_uint8, variables["mean"])
    return jax.nn.softmax(module.apply({"params": variables["params"]}, clip), axis=-1)

  return probabilities


def from_channel_first(arrays: Mapping[str, np.ndarray], bgr_input: bool = True
                       ) -> dict[str, np.ndarray]:
  """Channel-first C3D arrays (``{layer}/W``, ``{layer}/b``, ``mean``; Caffe/Chainer layout)
  -> this module's format. ``bgr_input``: the source network read BGR (Caffe's C3D does)."""
  converted: dict[str, np.ndarray] = {}
  for layer in CONV_LAYERS:
    kernel = np.transpose(arrays[f"{layer}/W"], (2, 3, 4, 1, 0))  # -> [T, H, W, C_in, C_out]
    if layer == "conv1a" and bgr_input:
      kernel = kernel[:, :, :, ::-1]
    converted[f"{layer}/kernel"] = np.ascontiguousarray(kernel, np.float32)
    converted[f"{layer}/bias"] = np.asarray(arrays[f"{layer}/b"], np.float32)
  last_width = arrays[f"{CONV_LAYERS[-1]}/W"].shape[0]
  for layer in FC_LAYERS:
    weight = np.asarray(arrays[f"{layer}/W"], np.float32)  # [out, in]
    if layer == "fc6":  # inputs flattened as (C, T, H, W) -> (T, H, W, C)
      spatial = weight.shape[1] // last_width
      side = int(round(np.sqrt(spatial)))
      weight = weight.reshape(weight.shape[0], last_width, 1, side, side)
      weight = np.transpose(weight, (0, 2, 3, 4, 1)).reshape(weight.shape[0], -1)
    converted[f"{layer}/kernel"] = np.ascontiguousarray(weight.T)
    converted[f"{layer}/bias"] = np.asarray(arrays[f"{layer}/b"], np.float32)
  mean = np.asarray(arrays["mean"], np.float32)
  if mean.ndim == 4:  # [3, T, H, W] -> [T, H, W, 3]
    mean = np.transpose(mean, (1, 2, 3, 0))
  converted["mean"] = np.ascontiguousarray(mean[..., ::-1] if bgr_input else mean)
  return converted
