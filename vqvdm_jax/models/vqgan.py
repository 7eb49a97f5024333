"""The 3D VQGAN tokenizer (VQ-VDM §3.1): encoder, quantizer and decoder of 3D convolutions.

Default shapes: a clip ``[B, 16, 128, 128, 3]`` encodes to a latent ``[B, 4, 16, 16, 4]``
(time / 4, space / 8, 4 channels). The surface stage 2 and notebooks use is MaskGIT's:
``encode``, ``quantize``, ``decode``, ``encode_to_indices``, ``decode_from_indices``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vqvdm_jax import config as config_lib
from vqvdm_jax.models.autoencoder import Decoder3D, Encoder3D
from vqvdm_jax.models.hierarchy import HierarchicalVQGAN3D
from vqvdm_jax.models.quantizers import QuantizerOutput, make_quantizer


class VQGAN3D(nn.Module):
  """Encoder -> quantizer -> decoder. ``__call__(video, train) -> (x_hat, QuantizerOutput)``."""

  model_config: ml_collections.ConfigDict
  quantizer_config: ml_collections.ConfigDict

  def setup(self):
    model = self.model_config
    shared = dict(
        channels=model.channels, channel_multipliers=tuple(model.channel_multipliers),
        num_res_blocks=model.num_res_blocks, temporal_downsample=model.temporal_downsample,
        spatial_downsample=model.spatial_downsample,
        attention_at_lowest=model.attention_at_lowest, attention_heads=model.attention_heads,
        num_groups=model.num_groups, causal=model.causal, conv_impl=model.conv_impl,
        spatial_patch=model.spatial_patch, colour_shortcut=model.colour_shortcut,
        dtype=jnp.dtype(model.dtype), remat=model.remat, attention_impl=model.attention_impl)
    self.encoder = Encoder3D(latent_channels=model.latent_channels, **shared)
    self.quantizer = make_quantizer(self.quantizer_config, model.latent_channels)
    self.decoder = Decoder3D(**shared)

  def encode(self, video: jax.Array) -> jax.Array:
    """video ``[B, T, H, W, 3]`` in [-1, 1] -> continuous latent z_e ``[B, t, h, w, c]``."""
    return self.encoder(video)

  def quantize(self, latent: jax.Array, train: bool = False) -> QuantizerOutput:
    return self.quantizer(latent, train=train)

  def nearest_codes(self, latent: jax.Array) -> jax.Array:
    """A latent in code space (a stage-2 sample of quantized latents) -> nearest code vectors.

    Equal to ``quantize(latent).quantized`` for 'vq', 'ema' and 'lfq'; for 'fsq' the quantizer
    bounds its input first, which only an encoder output needs.
    """
    return self.quantizer.nearest_codes(latent)

  def decode(self, quantized: jax.Array) -> jax.Array:
    """quantized latent ``[B, t, h, w, c]`` -> video ``[B, T, H, W, 3]`` (unclipped)."""
    return self.decoder(quantized)

  def encode_to_indices(self, video: jax.Array) -> jax.Array:
    """video -> code indices ``[B, t, h, w]`` int32."""
    return self.quantizer(self.encoder(video), train=False).indices

  def decode_from_indices(self, indices: jax.Array) -> jax.Array:
    return self.decoder(self.quantizer.codes_from_indices(indices))

  def __call__(self, video: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
    quantized = self.quantizer(self.encoder(video), train=train)
    return self.decoder(quantized.quantized), quantized


@config_lib.per_config
def latent_shape(config: ml_collections.ConfigDict, batch_size: int = 1) -> tuple[int, ...]:
  """The latent ``[B, t, h, w, c]`` a clip of ``config.data`` encodes to, by shape evaluation
  (two levels: the packed ``c + c_top`` channels stage 2 models), once per config."""
  model = make_vqgan(config)
  video = jax.ShapeDtypeStruct(
      (batch_size, config.data.num_frames, config.data.resolution, config.data.resolution, 3),
      jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), video)
  # By name: the two-level model (models/hierarchy.py) has its own ``encode``.
  latent = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode"), variables, video)
  return tuple(latent.shape)


def make_vqgan(config: ml_collections.ConfigDict) -> nn.Module:
  """The tokenizer ``config.vqgan.model`` describes: :class:`VQGAN3D`, or with
  ``hierarchy.levels=2`` VQ-VAE-2's two-level model, whose latent packs both levels on the
  bottom grid ``[B, t, h, w, c + c_top]``. Call its methods by name (``method='encode'``)."""
  if config.vqgan.model.hierarchy.levels == 2:
    return HierarchicalVQGAN3D(model_config=config.vqgan.model,
                               quantizer_config=config.vqgan.quantizer)
  return VQGAN3D(model_config=config.vqgan.model, quantizer_config=config.vqgan.quantizer)
