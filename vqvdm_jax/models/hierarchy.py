"""VQ-VAE-2's two-level 3D tokenizer (Razavi et al. 2019, Algorithm 1), on VQ-VDM's 3D VQGAN.

  h      = E_bottom(x)                  features at the bottom grid [B, t, h, w, F]
  e_top  = Q_top(E_top(h))              top latent [B, t / ft, h / fs, w / fs, c_top]
  up     = D_top(e_top)                 the quantized top back on the bottom grid [B, t, h, w, F]
  e_bot  = Q_bottom(conv([h, up]))      bottom latent [B, t, h, w, c], conditioned on the top
  x_hat  = D([e_bot, up])               the decoder reads both levels

``D_top`` is shared by the bottom encoder's conditioning and the decoder (VQ-VAE-2 has a
second, transposed-conv upsampler for the decoder): one upsampling network is enough for both
and costs half. Each level has its own quantizer (any kind of ``models/quantizers.py``).

Outside the model, the two levels travel as one **packed latent** ``[B, t, h, w, c + c_top]``:
the top latent repeated onto the bottom grid and concatenated along channels
(:func:`pack_levels`); :func:`unpack_levels` averages the repeats back. ``encode``, ``quantize``,
``nearest_codes`` and ``decode`` speak that packed latent, so stage 2 (the latent cache, one
U-Net over both levels, the samplers) runs on a two-level tokenizer unchanged. Code indices are
``{'bottom': [B, t, h, w], 'top': [B, t', h', w']}``.
"""

from __future__ import annotations

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vqvdm_jax.models import layers
from vqvdm_jax.models.autoencoder import Decoder3D, Encoder3D
from vqvdm_jax.models.quantizers import QuantizerOutput, make_quantizer


def pack_levels(bottom: jax.Array, top: jax.Array, factors: tuple[int, int]) -> jax.Array:
  """bottom ``[B, t, h, w, c]``, top ``[B, t/ft, h/fs, w/fs, c']`` -> ``[B, t, h, w, c + c']``.

  The top latent is repeated ``ft x fs x fs`` times (nearest-neighbour upsampling), so that one
  tensor on the bottom grid carries both levels.
  """
  time, space = factors
  top_up = einops.repeat(top, "b t h w c -> b (t ft) (h fh) (w fw) c", ft=time, fh=space,
                         fw=space)
  return jnp.concatenate([bottom, top_up.astype(bottom.dtype)], axis=-1)


def unpack_levels(packed: jax.Array, bottom_channels: int,
                  factors: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """Inverse of :func:`pack_levels`: ``(bottom, top)``; the top is the mean of its repeats
  (exact for a packed latent, the least-squares estimate for a sampled one)."""
  time, space = factors
  top = einops.reduce(packed[..., bottom_channels:], "b (t ft) (h fh) (w fw) c -> b t h w c",
                      "mean", ft=time, fh=space, fw=space)
  return packed[..., :bottom_channels], top


def batch_mean_codes(quantized: jax.Array) -> jax.Array:
  """Every position's code replaced by the batch's mean code vector ``[c]`` (same shape): a
  level that carries nothing clip-specific, to see what the *other* level alone reconstructs."""
  mean = jnp.mean(quantized, axis=tuple(range(quantized.ndim - 1)))
  return jnp.broadcast_to(mean, quantized.shape)


def combine_outputs(bottom: QuantizerOutput, top: QuantizerOutput,
                    quantized: jax.Array) -> QuantizerOutput:
  """Both levels' quantizer outputs as one: losses add (each level's L_vq, VQ-VDM eq. 2), the
  bottom keeps the one-level telemetry names and the top's are prefixed ``top/``."""
  return QuantizerOutput(
      quantized=quantized, indices=bottom.indices, loss=bottom.loss + top.loss,
      terms={**bottom.terms, **{f"top/{name}": value for name, value in top.terms.items()}},
      stats={**bottom.stats, **{f"top/{name}": value for name, value in top.stats.items()}})


class HierarchicalVQGAN3D(nn.Module):
  """VQ-VAE-2 Algorithm 1 in 3D: ``__call__(video, train) -> (x_hat, QuantizerOutput)``.

  The bottom encoder, bottom quantizer and decoder keep the one-level model's names
  (``encoder``, ``quantizer``, ``decoder``: the adaptive GAN weight reads
  ``params['decoder']['conv_out']``); the top level adds ``top_encoder``, ``top_quantizer``,
  ``top_decoder`` and the conditioning convolution ``bottom_head``.
  """

  model_config: ml_collections.ConfigDict
  quantizer_config: ml_collections.ConfigDict

  def setup(self):
    model, hierarchy = self.model_config, self.model_config.hierarchy
    features = model.channels * model.channel_multipliers[-1]  # F: the bottom encoder's width
    common = {
        "attention_at_lowest": model.attention_at_lowest,
        "attention_heads": model.attention_heads, "num_groups": model.num_groups,
        "causal": model.causal, "conv_impl": model.conv_impl, "dtype": jnp.dtype(model.dtype),
        "remat": model.remat, "attention_impl": model.attention_impl}
    bottom = {"channels": model.channels,
              "channel_multipliers": tuple(model.channel_multipliers),
              "num_res_blocks": model.num_res_blocks,
              "temporal_downsample": model.temporal_downsample,
              "spatial_downsample": model.spatial_downsample,
              "spatial_patch": model.spatial_patch, **common}
    # The top encoder and decoder: F wide throughout, one level per x2 step between the grids.
    steps = max(hierarchy.temporal_downsample, hierarchy.spatial_downsample).bit_length() - 1
    top = {"channels": features, "channel_multipliers": (1,) * (steps + 1),
           "num_res_blocks": hierarchy.num_res_blocks,
           "temporal_downsample": hierarchy.temporal_downsample,
           "spatial_downsample": hierarchy.spatial_downsample, **common}
    self.factors = (hierarchy.temporal_downsample, hierarchy.spatial_downsample)
    self.encoder = Encoder3D(latent_channels=features, **bottom)
    self.top_encoder = Encoder3D(latent_channels=hierarchy.latent_channels, **top)
    self.top_quantizer = make_quantizer(hierarchy.quantizer, hierarchy.latent_channels)
    self.top_decoder = Decoder3D(out_channels=features, **top)
    self.bottom_head = layers.Conv3D(model.latent_channels, conv_impl=model.conv_impl,
                                     dtype=jnp.dtype(model.dtype))
    self.quantizer = make_quantizer(self.quantizer_config, model.latent_channels)
    self.decoder = Decoder3D(**bottom)

  # ---------------------------------------------------------------- the two levels
  def encode_top(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """video ``[B, T, H, W, 3]`` -> (bottom features h ``[B, t, h, w, F]``, top z_e)."""
    features = self.encoder(video)
    return features, self.top_encoder(features)

  def encode_bottom(self, features: jax.Array, quantized_top: jax.Array) -> jax.Array:
    """The bottom z_e from the bottom features and the quantized top (Algorithm 1, line 4)."""
    return self._encode_bottom(features, self.top_decoder(quantized_top))

  def _encode_bottom(self, features: jax.Array, condition: jax.Array) -> jax.Array:
    return self.bottom_head(jnp.concatenate([features, condition], axis=-1)).astype(jnp.float32)

  def decode_levels(self, quantized_bottom: jax.Array, quantized_top: jax.Array) -> jax.Array:
    """Both levels' codes -> video ``[B, T, H, W, 3]`` (Algorithm 1, line 6)."""
    return self._decode(quantized_bottom, self.top_decoder(quantized_top))

  def _decode(self, quantized_bottom: jax.Array, condition: jax.Array) -> jax.Array:
    return self.decoder(jnp.concatenate(
        [quantized_bottom, condition.astype(quantized_bottom.dtype)], axis=-1))

  def _quantize_levels(self, video: jax.Array, train: bool
                       ) -> tuple[QuantizerOutput, QuantizerOutput, jax.Array]:
    """(bottom output, top output, D_top(e_top)): the top is quantized before the bottom is
    encoded; the upsampled top is returned so that decoding need not compute it again."""
    features, top_latent = self.encode_top(video)
    top = self.top_quantizer(top_latent, train=train)
    condition = self.top_decoder(top.quantized)
    bottom = self.quantizer(self._encode_bottom(features, condition), train=train)
    return bottom, top, condition

  def reconstruct_levels(self, video: jax.Array) -> dict[str, jax.Array]:
    """What each level carries (eval): the reconstruction from both, from the top alone (bottom
    codes replaced by their batch mean) and from the bottom alone (top likewise), and each
    level's code indices."""
    bottom, top, _ = self._quantize_levels(video, train=False)
    q_bottom, q_top = bottom.quantized, top.quantized
    # The three decodings as one batch (the decoder treats clips independently): one decoder
    # call, compiled once.
    decoded = self.decode_levels(
        jnp.concatenate([q_bottom, batch_mean_codes(q_bottom), q_bottom]),
        jnp.concatenate([q_top, q_top, batch_mean_codes(q_top)]))
    both, top_only, bottom_only = jnp.split(decoded, 3)
    return {"both": both, "top_only": top_only, "bottom_only": bottom_only,
            "indices": bottom.indices, "top_indices": top.indices}

  # ---------------------------------------------------------------- the tokenizer surface
  def _pack(self, bottom: jax.Array, top: jax.Array) -> jax.Array:
    return pack_levels(bottom, top, self.factors)

  def _unpack(self, packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    return unpack_levels(packed, self.model_config.latent_channels, self.factors)

  def encode(self, video: jax.Array) -> jax.Array:
    """video -> packed continuous latent ``[B, t, h, w, c + c_top]`` (bottom z_e, top z_e).

    The bottom z_e is conditioned on the *quantized* top, as in training.
    """
    features, top_latent = self.encode_top(video)
    quantized_top = self.top_quantizer(top_latent, train=False).quantized
    return self._pack(self.encode_bottom(features, quantized_top), top_latent)

  def quantize(self, latent: jax.Array, train: bool = False) -> QuantizerOutput:
    """Packed latent -> both levels quantized; ``quantized`` is packed again."""
    bottom_latent, top_latent = self._unpack(latent)
    top = self.top_quantizer(top_latent, train=train)
    bottom = self.quantizer(bottom_latent, train=train)
    return combine_outputs(bottom, top, self._pack(bottom.quantized, top.quantized))

  def nearest_codes(self, latent: jax.Array) -> jax.Array:
    """A packed latent in code space (a stage-2 sample) -> each level's nearest codes, packed."""
    bottom, top = self._unpack(latent)
    return self._pack(self.quantizer.nearest_codes(bottom), self.top_quantizer.nearest_codes(top))

  def decode(self, quantized: jax.Array) -> jax.Array:
    """Packed quantized latent -> video ``[B, T, H, W, 3]`` (unclipped)."""
    return self.decode_levels(*self._unpack(quantized))

  def encode_to_indices(self, video: jax.Array) -> dict[str, jax.Array]:
    """video -> ``{'bottom': [B, t, h, w], 'top': [B, t', h', w']}`` int32."""
    bottom, top, _ = self._quantize_levels(video, train=False)
    return {"bottom": bottom.indices, "top": top.indices}

  def decode_from_indices(self, indices: dict[str, jax.Array]) -> jax.Array:
    return self.decode_levels(self.quantizer.codes_from_indices(indices["bottom"]),
                              self.top_quantizer.codes_from_indices(indices["top"]))

  def __call__(self, video: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
    bottom, top, condition = self._quantize_levels(video, train)
    x_hat = self._decode(bottom.quantized, condition)
    return x_hat, combine_outputs(bottom, top, self._pack(bottom.quantized, top.quantized))
