"""The 3D convolutional encoder and decoder of the tokenizer (VQ-VDM §3.1), shared by the
one-level VQGAN (``models/vqgan.py``) and VQ-VAE-2's two-level one (``models/hierarchy.py``).

Tensors are channel-last: videos ``[B, T, H, W, C]``, latents ``[B, t, h, w, c]``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from vqvdm_jax.models import layers

Dtype = Any


def downsampling_plan(temporal_factor: int, spatial_factor: int) -> list[tuple[bool, bool]]:
  """(time?, space?) for each x2 downsampling between levels, time and space halved first."""
  time_steps, space_steps = int(math.log2(temporal_factor)), int(math.log2(spatial_factor))
  return [(i < time_steps, i < space_steps) for i in range(max(time_steps, space_steps))]


def fold_pixels(video: jax.Array, patch: int) -> jax.Array:
  """Space-to-depth: ``[B, T, H, W, C]`` -> ``[B, T, H / p, W / p, p * p * C]``, each p x p block
  of pixels one position (row-major within the block, then channel)."""
  return einops.rearrange(video, "b t (h p) (w q) c -> b t h w (p q c)", p=patch, q=patch)


def unfold_pixels(folded: jax.Array, patch: int) -> jax.Array:
  """The inverse of :func:`fold_pixels`: ``[B, T, h, w, p * p * C]`` -> ``[B, T, h p, w p, C]``."""
  return einops.rearrange(folded, "b t h w (p q c) -> b t (h p) (w q) c", p=patch, q=patch)


def cell_means(video: jax.Array, temporal: int, spatial: int, causal: bool) -> jax.Array:
  """Residual autoencoding's shortcut (Chen et al. 2024, DC-AE, "space-to-channel" averaged):
  the mean of the pixels each latent cell covers, ``[B, T, H, W, C]`` -> ``[B, t, h, w, C]``.

  Causal (the first frame encoded alone): the first cell holds frame 0 only, the next ones
  ``temporal`` frames each, as if frame 0 were repeated ``temporal - 1`` times in front.
  """
  if causal:
    video = jnp.concatenate([jnp.repeat(video[:, :1], temporal - 1, axis=1), video], axis=1)
  return einops.reduce(video, "b (t a) (h p) (w q) c -> b t h w c", "mean",
                       a=temporal, p=spatial, q=spatial)


def spread_cells(latent: jax.Array, temporal: int, spatial: int, causal: bool) -> jax.Array:
  """The decoder's side of :func:`cell_means`, ``[B, t, h, w, C]`` -> ``[B, T, H, W, C]``: each
  cell's value repeated over its frames and interpolated bilinearly between cell centres in space
  (half-pixel centres, edges held), so the colour field has no block edges to undo."""
  batch, frames, height, width, channels = latent.shape
  smooth = jax.image.resize(latent, (batch, frames, height * spatial, width * spatial, channels),
                            method="linear")
  video = jnp.repeat(smooth, temporal, axis=1)
  return video[:, temporal - 1:] if causal else video


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
  """x ``[B, T, H, W, 3]`` -> z_e ``[B, T / ft, H / fs, W / fs, latent_channels]``.

  ``spatial_patch`` p > 1 folds each p x p block of pixels into one position before the first
  convolution (:func:`fold_pixels`), so the first level runs at ``H / p``; it is part of ``fs``
  (the convolutions downsample by ``fs / p``).

  ``colour_shortcut`` adds each latent cell's mean colour (:func:`cell_means`) to the latent's
  first three channels, and the decoder adds those channels back, spread over the pixels
  (:func:`spread_cells`): a parameter-free path for the colours, which the convolutions
  otherwise learn last.
  """

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
  spatial_patch: int = 1
  colour_shortcut: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    res_block = _res_block_factory(self)
    plan = downsampling_plan(self.temporal_downsample,
                             self.spatial_downsample // self.spatial_patch)
    h = layers.Conv3D(self.channels, causal=self.causal, conv_impl=self.conv_impl,
                      dtype=self.dtype, name="conv_in")(fold_pixels(x, self.spatial_patch))
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
    z = layers.Conv3D(self.latent_channels, causal=self.causal, conv_impl=self.conv_impl,
                      dtype=self.dtype, name="conv_out")(h).astype(jnp.float32)
    if not self.colour_shortcut:
      return z
    means = cell_means(x.astype(jnp.float32), self.temporal_downsample,
                       self.spatial_downsample, self.causal)
    return z + jnp.pad(means, [(0, 0)] * 4 + [(0, self.latent_channels - means.shape[-1])])


class Decoder3D(nn.Module):
  """z_q ``[B, t, h, w, latent_channels]`` -> x_hat ``[B, T, H, W, 3]``; mirrors the encoder.

  The output convolution is named ``conv_out``: Taming's adaptive GAN weight takes gradient
  norms at its kernel, ``params['decoder']['conv_out']['kernel']``. With ``spatial_patch`` p > 1
  it gives p * p * ``out_channels`` channels, unfolded into p x p pixels (:func:`unfold_pixels`).
  With ``colour_shortcut`` the latent's first ``out_channels`` channels are added to the output,
  spread over the pixels (:func:`spread_cells`, :class:`Encoder3D`).
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
  spatial_patch: int = 1
  colour_shortcut: bool = False

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    res_block = _res_block_factory(self)
    plan = downsampling_plan(self.temporal_downsample,
                             self.spatial_downsample // self.spatial_patch)
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
    out = layers.Conv3D(self.out_channels * self.spatial_patch**2, causal=self.causal,
                        conv_impl=self.conv_impl, dtype=self.dtype, name="conv_out")(h)
    out = unfold_pixels(out, self.spatial_patch).astype(jnp.float32)
    if not self.colour_shortcut:
      return out
    return out + spread_cells(z[..., :self.out_channels].astype(jnp.float32),
                              self.temporal_downsample, self.spatial_downsample, self.causal)
