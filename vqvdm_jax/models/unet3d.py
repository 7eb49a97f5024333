"""The spatio-temporal 3D U-Net of VQ-VDM stage 2 (docs/paper.md): it predicts ε (or v) for latents.

Latents are channel-last, ``z [B, t, h, w, c]``. Every block is Residual Block → Spatial
Attention → Temporal Attention (VQ-VDM §3.2). The down path halves h and w (never t) between
levels and changes the width by ``channel_multipliers``; every down-path output is kept and
concatenated on channels into the matching up-path block (the ADM / LDM skip structure).
The conditioning embedding (timestep + FPS + class) is added inside every residual block.
"""

from __future__ import annotations

import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from vqvdm_jax.models.layers import (
    Conv3D,
    Downsample,
    Normalize,
    ResBlock3D,
    SelfAttention,
    Upsample,
    frame_causal_mask,
)

Dtype = Any


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal encoding PE(t) of Vaswani et al. 2017 §3.5, cos then sin as in ADM: [B] -> [B, dim].

  Used for diffusion timesteps and, with the same form, for FPS (VQ-VDM eq. 6); accepts
  integers or floats, so fractional frame rates (29.97) are encoded as they are.
  """
  half = dim // 2
  frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.asarray(timesteps, jnp.float32)[:, None] * frequencies[None, :]
  embedding = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
  if dim % 2:
    embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
  return embedding


CLASS_EMBEDDING_INIT = nn.initializers.normal(stddev=1.0)


class EmbeddingMLP(nn.Module):
  """Linear(SiLU(Linear(PE(x)))): the timestep embedding, and the FPS embedding of VQ-VDM eq. 6."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, values: jax.Array) -> jax.Array:
    # PE width = the U-Net's base channels (features // 4), as in ADM / LDM.
    encoding = timestep_embedding(values, max(self.features // 4, 2))
    hidden = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(encoding))
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(hidden)


class SpatialAttention(nn.Module):
  """Pre-GroupNorm self-attention over the h·w positions of each frame, with a residual."""

  num_heads: int = 1
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"  # 'xla', 'cudnn' or 'auto' (models/attention.py)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, H, W, C]
    batch, _, height, width, _ = x.shape
    h = Normalize(self.num_groups)(x)
    tokens = einops.rearrange(h, "b t h w c -> (b t) (h w) c")
    out = SelfAttention(self.num_heads, self.dtype, self.attention_impl)(tokens)
    out = einops.rearrange(out, "(b t) (h w) c -> b t h w c", b=batch, h=height, w=width)
    return x + out.astype(x.dtype)


class TemporalAttention(nn.Module):
  """Pre-GroupNorm causal self-attention over time at every spatial position, with a residual.

  VQ-VDM §3.2: h is rearranged to (B·H·W) × T × C and a frame attends to itself and earlier
  frames only. The GroupNorm here is per frame: statistics pooled over all frames would let a
  future frame shift the normalised values of past frames and so leak around the causal mask.
  """

  num_heads: int = 1
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, H, W, C]
    batch, frames, height, width, _ = x.shape
    h = Normalize(self.num_groups, causal=True)(x)
    tokens = einops.rearrange(h, "b t h w c -> (b h w) t c")
    out = SelfAttention(self.num_heads, self.dtype, self.attention_impl)(
        tokens, frame_causal_mask(frames, 1))
    out = einops.rearrange(out, "(b h w) t c -> b t h w c", b=batch, h=height, w=width)
    return x + out.astype(x.dtype)


class UNetBlock(nn.Module):
  """Residual Block (conditioning added inside) → Spatial Attention → Temporal Attention."""

  features: int
  use_attention: bool
  num_heads: int = 1
  num_groups: int = 32
  dropout: float = 0.0
  conv_impl: str = "auto"
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"
  scale_shift: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, embedding: jax.Array, train: bool = False) -> jax.Array:
    x = ResBlock3D(self.features, self.num_groups, conv_impl=self.conv_impl, dropout=self.dropout,
                   dtype=self.dtype, scale_shift=self.scale_shift,
                   name="res_block")(x, embedding, deterministic=not train)
    if self.use_attention:
      x = SpatialAttention(self.num_heads, self.num_groups, self.dtype, self.attention_impl,
                           name="spatial_attention")(x)
      x = TemporalAttention(self.num_heads, self.num_groups, self.dtype, self.attention_impl,
                            name="temporal_attention")(x)
    return x


class UNet3D(nn.Module):
  """ε_θ(z_t, t, f, c): ``z [B, t, h, w, c]`` → a prediction of the same shape (ε or v).

  ``attention_levels`` lists the level indices (0 = full latent resolution) whose blocks carry
  spatial and temporal attention; the middle block always does. ``num_classes = 0`` turns class
  conditioning off; otherwise label ``num_classes`` is the null label of classifier-free
  guidance, and ``labels=None`` means "unconditional" (every sample gets the null label).
  """

  # The architecture has no defaults here: `diffusion.model.make_unet` passes the config's.
  channels: int
  channel_multipliers: tuple[int, ...]
  num_res_blocks: int
  attention_levels: tuple[int, ...]
  num_heads: int
  num_groups: int
  dropout: float = 0.0
  num_classes: int = 0
  use_fps: bool = False
  conv_impl: str = "auto"
  dtype: Dtype = jnp.float32
  remat: bool = False  # recompute each block's activations in the backward pass
  attention_impl: str = "xla"  # 'xla', 'cudnn' or 'auto' (models/attention.py)
  scale_shift: bool = False  # condition through GroupNorm scale and shift (AdaGN), not a sum

  def _embedding(self, timesteps: jax.Array, fps: jax.Array | None,
                 labels: jax.Array | None, batch: int) -> jax.Array:
    """Timestep + FPS (VQ-VDM eq. 6) + class embeddings, summed: [B, 4 * channels]."""
    width = 4 * self.channels
    embedding = EmbeddingMLP(width, self.dtype, name="time_embedding")(timesteps)
    if self.use_fps:
      if fps is None:
        raise ValueError("UNet3D(use_fps=True) needs `fps` [B]; pass it or set use_fps=False.")
      embedding = embedding + EmbeddingMLP(width, self.dtype, name="fps_embedding")(fps)
    if self.num_classes > 0:
      if labels is None:  # unconditional: the null label of classifier-free guidance.
        labels = jnp.full((batch,), self.num_classes, jnp.int32)
      # Unit-variance rows (PyTorch's nn.Embedding init, as in ADM / LDM): Flax's default
      # 1/sqrt(width) made the class a ~10x weaker signal than the timestep, and a short run
      # learned to ignore it (benchmarks/RESULTS.md).
      class_embed = nn.Embed(self.num_classes + 1, width, embedding_init=CLASS_EMBEDDING_INIT,
                             name="class_embedding")
      embedding = embedding + class_embed(labels).astype(embedding.dtype)
    elif labels is not None:
      raise ValueError("UNet3D(num_classes=0) got `labels`; set num_classes or pass labels=None.")
    return embedding

  @nn.compact
  def __call__(self, z: jax.Array, timesteps: jax.Array, fps: jax.Array | None = None,
               labels: jax.Array | None = None, train: bool = False) -> jax.Array:
    batch, _, height, width, latent_channels = z.shape
    num_levels = len(self.channel_multipliers)
    factor = 2 ** (num_levels - 1)
    if height % factor or width % factor:
      raise ValueError(f"Latent size {height}x{width} is not divisible by {factor}, the U-Net's "
                       f"spatial downsampling for {num_levels} channel_multipliers levels.")
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    embedding = self._embedding(timesteps, fps, labels, batch)

    # `train` (argument 3, counting self) is a Python bool: static under remat.
    block_class = nn.remat(UNetBlock, static_argnums=(3,)) if self.remat else UNetBlock
    block = lambda level, features, name: block_class(  # noqa: E731
        features, level in self.attention_levels, self.num_heads, self.num_groups, self.dropout,
        self.conv_impl, self.dtype, self.attention_impl, self.scale_shift, name=name)

    h = Conv3D(self.channels, conv_impl=self.conv_impl, dtype=self.dtype, name="input_conv")(z)
    skips = [h]
    for level, multiplier in enumerate(self.channel_multipliers):
      for index in range(self.num_res_blocks):
        h = block(level, self.channels * multiplier, f"down_{level}_block_{index}")(
            h, embedding, train)
        skips.append(h)
      if level < num_levels - 1:
        # Space only: the latent has few frames (4 for a 16-frame clip) and time stays whole.
        next_features = self.channels * self.channel_multipliers[level + 1]
        h = Downsample(next_features, time=False, space=True, conv_impl=self.conv_impl,
                       dtype=self.dtype, name=f"down_{level}_downsample")(h)
        skips.append(h)

    middle_features = self.channels * self.channel_multipliers[-1]
    h = block_class(middle_features, True, self.num_heads, self.num_groups, self.dropout,
                    self.conv_impl, self.dtype, self.attention_impl, self.scale_shift,
                    name="middle_block")(h, embedding, train)
    h = ResBlock3D(middle_features, self.num_groups, conv_impl=self.conv_impl,
                   dropout=self.dropout, dtype=self.dtype, scale_shift=self.scale_shift,
                   name="middle_res_block")(
                       h, embedding, deterministic=not train)

    for level in reversed(range(num_levels)):
      features = self.channels * self.channel_multipliers[level]
      # One more block than the down path: it also consumes the downsample's (or input conv's) skip.
      for index in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = block(level, features, f"up_{level}_block_{index}")(h, embedding, train)
      if level > 0:
        previous_features = self.channels * self.channel_multipliers[level - 1]
        h = Upsample(previous_features, time=False, space=True, conv_impl=self.conv_impl,
                     dtype=self.dtype, name=f"up_{level}_upsample")(h)
    assert not skips, "every down-path output must be consumed by the up path"

    h = nn.silu(Normalize(self.num_groups, name="output_norm")(h))
    out = Conv3D(latent_channels, conv_impl=self.conv_impl, dtype=self.dtype,
                 name="output_conv")(h)
    # The loss and the sampler's arithmetic run in float32 whatever the compute dtype.
    return out.astype(jnp.float32)
