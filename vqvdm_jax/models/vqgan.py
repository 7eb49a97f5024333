"""The 3D VQGAN tokenizer (VQ-VDM §3.1): encoder, quantizer and decoder of 3D convolutions.

Default shapes: a clip ``[B, 16, 128, 128, 3]`` encodes to a latent ``[B, 4, 16, 16, 4]``
(time / 4, space / 8, 4 channels). The surface stage 2 and notebooks use is MaskGIT's:
``encode``, ``quantize``, ``decode``, ``encode_to_indices``, ``decode_from_indices``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vqvdm_jax.models import layers
from vqvdm_jax.models.quantizers import QuantizerOutput, make_quantizer

Dtype = Any


def downsampling_plan(temporal_factor: int, spatial_factor: int) -> list[tuple[bool, bool]]:
  """(time?, space?) for each x2 downsampling between levels, time and space halved first."""
  time_steps, space_steps = int(math.log2(temporal_factor)), int(math.log2(spatial_factor))
  return [(i < time_steps, i < space_steps) for i in range(max(time_steps, space_steps))]


def _res_block_factory(module: nn.Module):
  """``res_block(features)``: the next residual block of ``module``, rematerialised if asked.

  Blocks are named as linen would auto-name them (``ResBlock3D_<i>``), so turning remat on or
  off keeps the parameter tree, and checkpoints, unchanged.
  """
  block_class = nn.remat(layers.ResBlock3D) if module.remat else layers.ResBlock3D
  counter = itertools.count()

  def res_block(features: int) -> nn.Module:
    return block_class(features, num_groups=module.num_groups, causal=module.causal,
                       conv_impl=module.conv_impl, dtype=module.dtype,
                       name=f"ResBlock3D_{next(counter)}")

  return res_block


class Encoder3D(nn.Module):
  """x ``[B, T, H, W, 3]`` -> z_e ``[B, T / ft, H / fs, W / fs, latent_channels]``."""

  channels: int
  channel_multipliers: tuple[int, ...]
  num_res_blocks: int
  temporal_downsample: int
  spatial_downsample: int
  latent_channels: int
  attention_at_lowest: bool
  attention_heads: int
  num_groups: int
  causal: bool
  conv_impl: str
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    res_block = _res_block_factory(self)
    plan = downsampling_plan(self.temporal_downsample, self.spatial_downsample)
    h = layers.Conv3D(self.channels, causal=self.causal, conv_impl=self.conv_impl,
                      dtype=self.dtype, name="conv_in")(x)
    for level, multiplier in enumerate(self.channel_multipliers):
      features = self.channels * multiplier
      for _ in range(self.num_res_blocks):
        h = res_block(features)(h)
      if level < len(plan):  # validate() guarantees len(plan) == levels - 1.
        time, space = plan[level]
        h = layers.Downsample(features, time, space, causal=self.causal,
                              conv_impl=self.conv_impl, dtype=self.dtype)(h)
    features = self.channels * self.channel_multipliers[-1]
    h = res_block(features)(h)
    if self.attention_at_lowest:
      h = layers.AttentionBlock3D(self.attention_heads, self.num_groups, self.causal,
                                  dtype=self.dtype, attention_impl=self.attention_impl)(h)
    h = res_block(features)(h)
    h = nn.silu(layers.Normalize(self.num_groups, self.causal)(h))
    return layers.Conv3D(self.latent_channels, causal=self.causal, conv_impl=self.conv_impl,
                         dtype=self.dtype, name="conv_out")(h).astype(jnp.float32)


class Decoder3D(nn.Module):
  """z_q ``[B, t, h, w, latent_channels]`` -> x_hat ``[B, T, H, W, 3]``; mirrors the encoder.

  The output convolution is named ``conv_out``: Taming's adaptive GAN weight takes gradient
  norms at its kernel, ``params['decoder']['conv_out']['kernel']``.
  """

  channels: int
  channel_multipliers: tuple[int, ...]
  num_res_blocks: int
  temporal_downsample: int
  spatial_downsample: int
  attention_at_lowest: bool
  attention_heads: int
  num_groups: int
  causal: bool
  conv_impl: str
  out_channels: int = 3
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    res_block = _res_block_factory(self)
    plan = downsampling_plan(self.temporal_downsample, self.spatial_downsample)
    features = self.channels * self.channel_multipliers[-1]
    h = layers.Conv3D(features, causal=self.causal, conv_impl=self.conv_impl, dtype=self.dtype,
                      name="conv_in")(z)
    h = res_block(features)(h)
    if self.attention_at_lowest:
      h = layers.AttentionBlock3D(self.attention_heads, self.num_groups, self.causal,
                                  dtype=self.dtype, attention_impl=self.attention_impl)(h)
    h = res_block(features)(h)
    for level in reversed(range(len(self.channel_multipliers))):
      features = self.channels * self.channel_multipliers[level]
      for _ in range(self.num_res_blocks):
        h = res_block(features)(h)
      if level > 0:
        time, space = plan[level - 1]
        h = layers.Upsample(features, time, space, causal=self.causal,
                            conv_impl=self.conv_impl, dtype=self.dtype)(h)
    h = nn.silu(layers.Normalize(self.num_groups, self.causal)(h))
    return layers.Conv3D(self.out_channels, causal=self.causal, conv_impl=self.conv_impl,
                         dtype=self.dtype, name="conv_out")(h).astype(jnp.float32)


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


def latent_shape(config: ml_collections.ConfigDict, batch_size: int = 1) -> tuple[int, ...]:
  """The latent ``[B, t, h, w, c]`` a clip of ``config.data`` encodes to, by shape evaluation."""
  model = make_vqgan(config)
  video = jax.ShapeDtypeStruct(
      (batch_size, config.data.num_frames, config.data.resolution, config.data.resolution, 3),
      jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), video)
  latent = jax.eval_shape(lambda v, x: model.apply(v, x, method=VQGAN3D.encode), variables, video)
  return tuple(latent.shape)


def make_vqgan(config: ml_collections.ConfigDict) -> VQGAN3D:
  return VQGAN3D(model_config=config.vqgan.model, quantizer_config=config.vqgan.quantizer)
