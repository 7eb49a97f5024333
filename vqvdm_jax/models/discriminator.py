"""The light 3D discriminator of VQ-VDM §3.1: 3D convolutions that downsample at every layer.

A PatchGAN-style stack (as in Taming's NLayerDiscriminator, made 3D as in TATS): each layer is a
kernel-4, stride-2 replicate-padded 3D conv followed by LeakyReLU(0.2), with GroupNorm on every
layer but the first. It returns a grid of real/fake logits (one per spatio-temporal patch) and
every layer's activation, which the generator matches in L_disc_aux (pix2pixHD feature matching).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqvdm_jax.models.layers import Conv3D, Normalize

Dtype = Any

_KERNEL_SIZE = 4  # PatchGAN's kernel: with stride 2 every input pixel is seen by two outputs.
_LOGIT_KERNEL_SIZE = 3
_MAX_CHANNEL_MULTIPLIER = 8  # Taming / pix2pix cap the width at 8x the first layer's.
_LEAKY_SLOPE = 0.2


def _stride(size: int) -> int:
  """Stride 2 while the axis still has more than one element, else 1 (a 1-frame clip, an image).

  A kernel-4 stride-2 conv on a length-1 axis would give zero outputs, so such an axis is kept.
  """
  return 2 if size > 1 else 1


class Discriminator3D(nn.Module):
  """``video [B, T, H, W, 3] -> (logits [B, t', h', w', 1], features)``.

  ``features`` holds the activation after each of the ``num_layers`` downsampling layers
  (``[B, T/2^i, H/2^i, W/2^i, C_i]``), the D⁽ⁱ⁾ of VQ-VDM's feature-matching term. Logits are
  returned in float32 so the GAN losses are computed at full precision under bfloat16. Its convs
  have canonical gradients (``layers.Conv3D``): the trainer differentiates it inside a
  ``lax.cond``, where XLA:CPU would otherwise run their gradients in its generic loop emitter.
  """

  channels: int
  num_layers: int
  num_groups: int = 32
  conv_impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, video: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    if self.num_layers < 1:
      raise ValueError(f"Discriminator3D needs num_layers >= 1, got {self.num_layers}.")
    h = video.astype(self.dtype)
    features = []
    for layer in range(self.num_layers):
      width = self.channels * min(2**layer, _MAX_CHANNEL_MULTIPLIER)
      # Strides are static: computed from the (static) shape this layer receives.
      strides = tuple(_stride(size) for size in h.shape[1:4])
      h = Conv3D(width, (_KERNEL_SIZE,) * 3, strides, conv_impl=self.conv_impl,
                 use_bias=layer == 0,  # the GroupNorm that follows has its own bias.
                 dtype=self.dtype, canonical_gradients=True, name=f"conv_{layer}")(h)
      if layer > 0:
        # No norm on the first layer (pix2pix): it would wash out the input's colour statistics.
        h = Normalize(self.num_groups, name=f"norm_{layer}")(h)
      h = nn.leaky_relu(h, _LEAKY_SLOPE)
      features.append(h)
    logits = Conv3D(1, (_LOGIT_KERNEL_SIZE,) * 3, conv_impl=self.conv_impl, dtype=self.dtype,
                    canonical_gradients=True, name="logits")(h)
    return logits.astype(jnp.float32), features
