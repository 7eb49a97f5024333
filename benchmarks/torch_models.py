"""The tokenizer and the U-Net of vqvdm_jax written plainly in PyTorch, for benchmarks/vs_pytorch.py.

Same architecture, layer for layer, as ``vqvdm_jax/models/{layers,vqgan,unet3d}.py`` (and the
same parameter count, which vs_pytorch.py checks): 3D convs with replicate padding, GroupNorm,
SiLU, residual blocks, strided-conv downsampling, nearest upsampling + conv, the 'vq' quantizer
with a straight-through estimator, and the U-Net's residual / spatial / causal temporal
attention blocks with ADM skips. PyTorch tensors are channel-first ``[B, C, T, H, W]``; this
module is only a timing peer (never imported by the package or its tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _group_count(channels: int, num_groups: int) -> int:
  groups = min(num_groups, channels)
  while channels % groups:
    groups -= 1
  return groups


def _pads(kernel: tuple[int, int, int], strides: tuple[int, int, int]) -> tuple[int, ...]:
  """F.pad's (W, H, T) before/after list for a 'same'-sized / strided VALID conv (layers.py)."""
  pads = []
  for k, s in reversed(list(zip(kernel, strides))):
    total = max(k - s, 0)
    pads += [total - total // 2, total // 2]
  return tuple(pads)


class Conv3d(nn.Module):
  def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), strides=(1, 1, 1)):
    super().__init__()
    self.conv = nn.Conv3d(cin, cout, kernel, strides)
    self.pads = _pads(kernel, strides)

  def forward(self, x):
    if any(self.pads):
      x = F.pad(x, self.pads, mode="replicate")
    return self.conv(x)


class GroupNorm(nn.GroupNorm):
  def __init__(self, channels: int, num_groups: int):
    super().__init__(_group_count(channels, num_groups), channels, eps=1e-6)


class FrameGroupNorm(GroupNorm):
  """GroupNorm per frame (the U-Net's temporal attention: causal=True in layers.Normalize)."""

  def forward(self, x):
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)
    return super().forward(frames).reshape(b, t, c, h, w).transpose(1, 2)


class ResBlock(nn.Module):
  def __init__(self, cin: int, cout: int, num_groups: int, embed_dim: int = 0,
               scale_shift: bool = False):
    super().__init__()
    self.norm1, self.conv1 = GroupNorm(cin, num_groups), Conv3d(cin, cout)
    self.norm2, self.conv2 = GroupNorm(cout, num_groups), Conv3d(cout, cout)
    self.scale_shift = scale_shift
    self.embed = (nn.Linear(embed_dim, cout * (2 if scale_shift else 1)) if embed_dim else None)
    self.skip = Conv3d(cin, cout, (1, 1, 1)) if cin != cout else None

  def forward(self, x, embedding=None):
    h = self.conv1(F.silu(self.norm1(x)))
    if self.embed is None:
      h = self.norm2(h)
    else:
      projected = self.embed(F.silu(embedding))[:, :, None, None, None]
      if self.scale_shift:
        scale, shift = projected.chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
      else:
        h = self.norm2(h + projected)
    h = self.conv2(F.silu(h))
    return (x if self.skip is None else self.skip(x)) + h


class SelfAttention(nn.Module):
  """qkv projection -> scaled dot-product attention -> output projection, tokens [N, L, C]."""

  def __init__(self, channels: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.qkv, self.out = nn.Linear(channels, 3 * channels), nn.Linear(channels, channels)

  def forward(self, tokens, causal: bool = False):
    n, length, c = tokens.shape
    qkv = self.qkv(tokens).reshape(n, length, 3, self.num_heads, c // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [N, heads, L, head_dim]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return self.out(out.transpose(1, 2).reshape(n, length, c))


class AttentionBlock(nn.Module):
  """The tokenizer's attention over every (t, h, w) position."""

  def __init__(self, channels: int, num_heads: int, num_groups: int):
    super().__init__()
    self.norm, self.attention = GroupNorm(channels, num_groups), SelfAttention(channels, num_heads)

  def forward(self, x):
    b, c, t, h, w = x.shape
    tokens = self.norm(x).flatten(2).transpose(1, 2)
    return x + self.attention(tokens).transpose(1, 2).reshape(b, c, t, h, w)


def _plan(temporal: int, spatial: int) -> list[tuple[bool, bool]]:
  time_steps, space_steps = int(math.log2(temporal)), int(math.log2(spatial))
  return [(i < time_steps, i < space_steps) for i in range(max(time_steps, space_steps))]


def fold_pixels(x, patch: int):
  """Space-to-depth on ``[N, C, T, H, W]``: each p x p block of pixels one position."""
  n, c, t, h, w = x.shape
  x = x.reshape(n, c, t, h // patch, patch, w // patch, patch)
  return x.permute(0, 4, 6, 1, 2, 3, 5).reshape(n, patch * patch * c, t, h // patch, w // patch)


def unfold_pixels(x, patch: int):
  """The inverse of :func:`fold_pixels`."""
  n, folded, t, h, w = x.shape
  c = folded // (patch * patch)
  x = x.reshape(n, patch, patch, c, t, h, w).permute(0, 3, 4, 5, 1, 6, 2)
  return x.reshape(n, c, t, h * patch, w * patch)


class Encoder(nn.Module):
  def __init__(self, m):
    super().__init__()
    self.patch = m.spatial_patch
    plan = _plan(m.temporal_downsample, m.spatial_downsample // self.patch)
    layers = [Conv3d(3 * self.patch**2, m.channels)]
    cin = m.channels
    for level, mult in enumerate(m.channel_multipliers):
      for _ in range(m.num_res_blocks):
        layers.append(ResBlock(cin, m.channels * mult, m.num_groups))
        cin = m.channels * mult
      if level < len(plan):
        time, space = plan[level]
        layers.append(Conv3d(cin, cin, (3, 3, 3), (2 if time else 1, 2 if space else 1,
                                                   2 if space else 1)))
    layers.append(ResBlock(cin, cin, m.num_groups))
    if m.attention_at_lowest:
      layers.append(AttentionBlock(cin, m.attention_heads, m.num_groups))
    layers += [ResBlock(cin, cin, m.num_groups), GroupNorm(cin, m.num_groups), nn.SiLU(),
               Conv3d(cin, m.latent_channels)]
    self.layers = nn.Sequential(*layers)

  def forward(self, x):
    return self.layers(fold_pixels(x, self.patch) if self.patch > 1 else x)


class Upsample(nn.Module):
  def __init__(self, cin: int, cout: int, time: bool, space: bool):
    super().__init__()
    self.factor = (2 if time else 1, 2 if space else 1, 2 if space else 1)
    self.conv = Conv3d(cin, cout)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=self.factor, mode="nearest"))


class Decoder(nn.Module):
  def __init__(self, m):
    super().__init__()
    self.patch = m.spatial_patch
    plan = _plan(m.temporal_downsample, m.spatial_downsample // self.patch)
    cin = m.channels * m.channel_multipliers[-1]
    layers = [Conv3d(m.latent_channels, cin), ResBlock(cin, cin, m.num_groups)]
    if m.attention_at_lowest:
      layers.append(AttentionBlock(cin, m.attention_heads, m.num_groups))
    layers.append(ResBlock(cin, cin, m.num_groups))
    for level in reversed(range(len(m.channel_multipliers))):
      features = m.channels * m.channel_multipliers[level]
      for _ in range(m.num_res_blocks):
        layers.append(ResBlock(cin, features, m.num_groups))
        cin = features
      if level > 0:
        layers.append(Upsample(cin, cin, *plan[level - 1]))
    layers += [GroupNorm(cin, m.num_groups), nn.SiLU(), Conv3d(cin, 3 * self.patch**2)]
    self.layers = nn.Sequential(*layers)

  def forward(self, z):
    out = self.layers(z)
    return unfold_pixels(out, self.patch) if self.patch > 1 else out


class VectorQuantizer(nn.Module):
  """'vq': nearest code, codebook + beta * commitment loss, straight-through (VQ-VDM eq. 2)."""

  def __init__(self, codebook_size: int, channels: int, beta: float):
    super().__init__()
    self.codebook = nn.Parameter(torch.randn(codebook_size, channels))
    self.beta = beta

  def forward(self, z):
    b, c, t, h, w = z.shape
    flat = z.permute(0, 2, 3, 4, 1).reshape(-1, c)
    distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t()
                 + self.codebook.pow(2).sum(1))
    codes = self.codebook[distances.argmin(1)]
    loss = F.mse_loss(codes, flat.detach()) + self.beta * F.mse_loss(flat, codes.detach())
    quantized = flat + (codes - flat).detach()
    return quantized.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3), loss


class VQGAN(nn.Module):
  def __init__(self, model_config, quantizer_config):
    super().__init__()
    self.encoder, self.decoder = Encoder(model_config), Decoder(model_config)
    self.quantizer = VectorQuantizer(quantizer_config.codebook_size, model_config.latent_channels,
                                     quantizer_config.beta)

  def forward(self, video):
    quantized, loss = self.quantizer(self.encoder(video))
    return self.decoder(quantized), loss


# ---------------------------------------------------------------- the U-Net (unet3d.py)


def timestep_embedding(values, dim: int):
  half = dim // 2
  frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
  angles = values.float()[:, None] * frequencies[None]
  return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class EmbeddingMLP(nn.Module):
  def __init__(self, width: int):
    super().__init__()
    self.dim = max(width // 4, 2)
    self.linear_1, self.linear_2 = nn.Linear(self.dim, width), nn.Linear(width, width)

  def forward(self, values):
    return self.linear_2(F.silu(self.linear_1(timestep_embedding(values, self.dim))))


class SpatialAttention(nn.Module):
  def __init__(self, channels: int, num_heads: int, num_groups: int):
    super().__init__()
    self.norm, self.attention = GroupNorm(channels, num_groups), SelfAttention(channels, num_heads)

  def forward(self, x):
    b, c, t, h, w = x.shape
    tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
    out = self.attention(tokens).reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
    return x + out


class TemporalAttention(nn.Module):
  def __init__(self, channels: int, num_heads: int, num_groups: int):
    super().__init__()
    self.norm = FrameGroupNorm(channels, num_groups)
    self.attention = SelfAttention(channels, num_heads)

  def forward(self, x):
    b, c, t, h, w = x.shape
    tokens = self.norm(x).permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)
    out = self.attention(tokens, causal=True).reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)
    return x + out


class UNetBlock(nn.Module):
  def __init__(self, cin, cout, attention, u, embed_dim):
    super().__init__()
    self.res = ResBlock(cin, cout, u.num_groups, embed_dim, u.scale_shift_norm)
    self.attention = nn.Sequential(SpatialAttention(cout, u.num_heads, u.num_groups),
                                   TemporalAttention(cout, u.num_heads, u.num_groups)
                                   ) if attention else None

  def forward(self, x, embedding):
    x = self.res(x, embedding)
    return x if self.attention is None else self.attention(x)


class UNet(nn.Module):
  def __init__(self, config, latent_channels: int):
    super().__init__()
    u = config.diffusion.unet
    ch, mults = u.channels, tuple(u.channel_multipliers)
    width = 4 * ch
    self.time_embedding = EmbeddingMLP(width)
    self.fps_embedding = EmbeddingMLP(width) if config.diffusion.use_fps else None
    self.class_embedding = (nn.Embedding(config.data.num_classes + 1, width)
                            if config.diffusion.use_class else None)
    self.input_conv = Conv3d(latent_channels, ch)
    self.down = nn.ModuleList()
    skip_channels, cin = [ch], ch
    for level, mult in enumerate(mults):
      for _ in range(u.num_res_blocks):
        self.down.append(UNetBlock(cin, ch * mult, level in u.attention_levels, u, width))
        cin = ch * mult
        skip_channels.append(cin)
      if level < len(mults) - 1:
        self.down.append(Conv3d(cin, ch * mults[level + 1], (3, 3, 3), (1, 2, 2)))
        cin = ch * mults[level + 1]
        skip_channels.append(cin)
    self.middle = UNetBlock(cin, cin, True, u, width)
    self.middle_res = ResBlock(cin, cin, u.num_groups, width, u.scale_shift_norm)
    self.up = nn.ModuleList()
    for level in reversed(range(len(mults))):
      for _ in range(u.num_res_blocks + 1):
        self.up.append(UNetBlock(cin + skip_channels.pop(), ch * mults[level],
                                 level in u.attention_levels, u, width))
        cin = ch * mults[level]
      if level > 0:
        self.up.append(Upsample(cin, ch * mults[level - 1], False, True))
        cin = ch * mults[level - 1]
    self.output_norm = GroupNorm(cin, u.num_groups)
    self.output_conv = Conv3d(cin, latent_channels)

  def forward(self, z, timesteps, fps, labels):
    embedding = self.time_embedding(timesteps)
    if self.fps_embedding is not None:
      embedding = embedding + self.fps_embedding(fps)
    if self.class_embedding is not None:
      embedding = embedding + self.class_embedding(labels)
    h = self.input_conv(z)
    skips = [h]
    for module in self.down:
      h = module(h, embedding) if isinstance(module, UNetBlock) else module(h)
      skips.append(h)
    h = self.middle_res(self.middle(h, embedding), embedding)
    for module in self.up:
      if isinstance(module, UNetBlock):
        h = module(torch.cat([h, skips.pop()], dim=1), embedding)
      else:
        h = module(h)
    return self.output_conv(F.silu(self.output_norm(h)))
