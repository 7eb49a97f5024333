"""The token priors as the config describes them, and what both share: vocabulary, conditioning,
guidance on logits and the sampling of a code from logits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vqvdm_jax import config as config_lib
from vqvdm_jax import row_random
from vqvdm_jax.diffusion.model import null_label
from vqvdm_jax.models.transformer import TokenTransformer, code_digits, digits_to_codes
from vqvdm_jax.models.vqgan import latent_shape

PyTree = Any
TOKEN_PRIORS = ("autoregressive", "masked")


LEVELS = ("bottom", "top")  # a two-level tokenizer's (models/hierarchy.py); one level: 'bottom'


def _level_quantizer(config: ml_collections.ConfigDict,
                     level: str) -> tuple[ml_collections.ConfigDict, int]:
  """(quantizer config, latent channels) of a tokenizer level."""
  if level not in LEVELS:
    raise ValueError(f"level={level!r}: one of {LEVELS}.")
  if level == "top":
    hierarchy = config.vqgan.model.hierarchy
    return hierarchy.quantizer, int(hierarchy.latent_channels)
  return config.vqgan.quantizer, int(config.vqgan.model.latent_channels)


def num_levels(config: ml_collections.ConfigDict) -> int:
  return int(config.vqgan.model.hierarchy.levels)


def vocabulary_size(config: ml_collections.ConfigDict, level: str = "bottom") -> int:
  """How many codes a tokenizer level has: the codebook, 2^K for LFQ (MAGVIT-v2's codes read as
  a plain vocabulary), the product of the levels for FSQ."""
  quantizer, channels = _level_quantizer(config, level)
  if quantizer.kind == "lfq":
    return 2 ** channels
  if quantizer.kind == "fsq":
    return math.prod(int(level) for level in quantizer.fsq_levels)
  return int(quantizer.codebook_size)


FACTORIZATIONS = ("auto", "plain", "channels")
MAX_PLAIN_VOCABULARY = 2 ** 16  # 'auto' factorises LFQ / FSQ codes beyond this many


def code_factors(config: ml_collections.ConfigDict, level: str = "bottom") -> tuple[int, ...]:
  """The radices of a level's code digits (``transformer.model.code_factorization``): one
  factor, the whole vocabulary ('plain'), or one per latent channel for LFQ (2 each) and FSQ
  (its levels; MAGVIT-v2's token factorisation, 'channels'). 'auto': per channel when LFQ / FSQ
  have more than 2^16 codes, else plain."""
  quantizer, channels = _level_quantizer(config, level)
  choice = config.transformer.model.code_factorization
  if choice not in FACTORIZATIONS:
    raise ValueError(f"transformer.model.code_factorization={choice!r}: one of {FACTORIZATIONS}.")
  per_channel = {"lfq": (2,) * channels,
                 "fsq": tuple(int(level) for level in quantizer.get("fsq_levels", ()))}
  if choice == "channels" and quantizer.kind not in per_channel:
    raise ValueError(f"transformer.model.code_factorization='channels' needs LFQ or FSQ codes, "
                     f"not vqgan.quantizer.kind={quantizer.kind!r}.")
  if choice == "channels" or (choice == "auto" and quantizer.kind in per_channel
                              and vocabulary_size(config, level) > MAX_PLAIN_VOCABULARY):
    return per_channel[quantizer.kind]
  return (vocabulary_size(config, level),)


def token_grid(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(t, h, w) of a clip's code grid (two levels: the bottom one's)."""
  return tuple(latent_shape(config)[1:4])


def top_token_grid(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(t', h', w') of a two-level tokenizer's top code grid; () for one level."""
  if num_levels(config) == 1:
    return ()
  hierarchy = config.vqgan.model.hierarchy
  frames, height, width = token_grid(config)
  return (frames // hierarchy.temporal_downsample, height // hierarchy.spatial_downsample,
          width // hierarchy.spatial_downsample)


def sequence_length(config: ml_collections.ConfigDict) -> int:
  """Codes a prior models per clip: every level's."""
  return math.prod(token_grid(config)) + math.prod(top_token_grid(config) or (0,))


def unflatten_levels(codes: jax.Array, config: ml_collections.ConfigDict
                     ) -> jax.Array | dict[str, jax.Array]:
  """A prior's codes ``[B, L]`` -> what the tokenizer decodes: ``[B, t, h, w]``, or
  ``{'top': [B, t', h', w'], 'bottom': [B, t, h, w]}`` for two levels (the inverse of
  ``data.tokens.flatten_levels``)."""
  batch, grid, top_grid = codes.shape[0], token_grid(config), top_token_grid(config)
  if not top_grid:
    return codes.reshape(batch, *grid)
  top_length = math.prod(top_grid)
  return {"top": codes[:, :top_length].reshape(batch, *top_grid),
          "bottom": codes[:, top_length:].reshape(batch, *grid)}


def make_transformer(config: ml_collections.ConfigDict, decode: bool = False
                     ) -> TokenTransformer:
  """The transformer of ``config.stage2`` (causal for 'autoregressive', bidirectional for
  'masked'); ``decode`` builds the key/value-cached variant for autoregressive sampling."""
  if config.stage2 not in TOKEN_PRIORS:
    raise ValueError(f"config.stage2={config.stage2!r} is not a token prior {TOKEN_PRIORS}.")
  model = config.transformer.model
  return TokenTransformer(
      vocab_size=vocabulary_size(config), num_classes=config.data.num_classes,
      grid=token_grid(config), width=model.width, depth=model.depth, num_heads=model.num_heads,
      mlp_ratio=model.mlp_ratio, dropout=model.dropout,
      causal=config.stage2 == "autoregressive", use_fps=config.diffusion.use_fps, decode=decode,
      dtype=jnp.dtype(model.dtype), attention_impl=model.attention_impl, remat=model.remat,
      factors=code_factors(config), **top_level(config))


def top_level(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The transformer's top-level fields (two-level tokenizer), or none."""
  if num_levels(config) == 1:
    return {}
  return {"top_grid": top_token_grid(config), "top_vocab_size": vocabulary_size(config, "top"),
          "top_factors": code_factors(config, "top")}


def init_transformer_params(model: TokenTransformer, rng: jax.Array) -> PyTree:
  codes = jnp.zeros((1, model.num_codes), jnp.int32)
  return model.init(rng, codes, jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.float32))["params"]


@config_lib.per_config
def abstract_transformer_params(config: ml_collections.ConfigDict) -> PyTree:
  """The shapes of :func:`init_transformer_params` for ``config.stage2``'s transformer, traced
  once per config."""
  return jax.eval_shape(lambda: init_transformer_params(make_transformer(config),
                                                        jax.random.PRNGKey(0)))


def conditioning_labels(config: ml_collections.ConfigDict, labels: jax.Array) -> jax.Array:
  """The class tokens' labels: as given, or all the null class for an unconditional prior."""
  if config.diffusion.use_class:
    return labels
  return jnp.full_like(labels, null_label(config))


def guided_logits(conditional: jax.Array, unconditional: jax.Array, scale: float) -> jax.Array:
  """Classifier-free guidance on logits (MUSE, MAGVIT; the logit form of VQ-VDM eq. 9):
  ``l_u + w (l_c - l_u)``: w = 1 is the conditional model, w = 0 the unconditional one."""
  return unconditional + scale * (conditional - unconditional)


def with_null_class(labels: jax.Array, fps: jax.Array, null: int,
                    scale: float) -> tuple[jax.Array, jax.Array]:
  """Labels and FPS of one model call for guidance: the batch, then the batch with the null
  class (``[2B]``), or the batch alone when ``scale`` is 1 (nothing to guide)."""
  if scale == 1.0:
    return labels, fps
  return jnp.concatenate([labels, jnp.full_like(labels, null)]), jnp.concatenate([fps, fps])


def combine_guided(logits: jax.Array | tuple[jax.Array, ...], scale: float
                   ) -> jax.Array | tuple[jax.Array, ...]:
  """The guided logits of a :func:`with_null_class` call's output ``[2B, ...]`` (two levels:
  each level's)."""
  if scale == 1.0:
    return logits
  if isinstance(logits, tuple):
    return tuple(combine_guided(level, scale) for level in logits)
  conditional, unconditional = jnp.split(logits, 2)
  return guided_logits(conditional, unconditional, scale)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Top-k (Fan et al. 2018) then nucleus / top-p (Holtzman et al. 2020) filtering of
  ``[..., V]`` logits: removed codes get -inf. ``top_k=0`` and ``top_p=1`` turn them off."""
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probabilities = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probabilities, axis=-1) - probabilities  # mass of the likelier codes
    kept = jnp.where(before < top_p, sorted_logits, jnp.inf)  # the first one always stays
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def split_digits(logits: jax.Array, factors: tuple[int, ...]) -> list[jax.Array]:
  """``[..., Σ factors]`` logits -> one ``[..., factor]`` block per digit."""
  bounds = [sum(factors[:i]) for i in range(1, len(factors))]
  return jnp.split(logits, bounds, axis=-1)


def sequence_log_probability(logits: jax.Array | Sequence[jax.Array], codes: jax.Array,
                             factors: tuple[int, ...] | Sequence[tuple[int, ...]] | None = None
                             ) -> jax.Array:
  """log p(code) ``[B, L]`` of a whole sequence: :func:`code_log_probability` for one level's
  logits and ``factors``; for two levels' logits ``(top, bottom)`` and per-level ``factors``
  (the transformer's ``level_factors``), each level under its own, concatenated."""
  if not isinstance(logits, (tuple, list)):
    if factors and isinstance(factors[0], tuple):  # one level's of level_factors
      (factors,) = factors
    return code_log_probability(logits, codes, factors)
  parts, start = [], 0
  for block, level_factors in zip(logits, factors, strict=True):
    length = block.shape[1]
    parts.append(code_log_probability(block, codes[:, start:start + length], level_factors))
    start += length
  return jnp.concatenate(parts, axis=1)


def code_log_probability(logits: jax.Array, codes: jax.Array,
                         factors: tuple[int, ...] | None = None) -> jax.Array:
  """log p(code) ``[...]`` under ``[..., Σ factors]`` logits: the sum of its digits' log-softmax
  (MAGVIT-v2's factorised tokens are conditionally independent given the context)."""
  factors = factors or (logits.shape[-1],)
  digits = code_digits(codes, factors) if len(factors) > 1 else codes[..., None]
  return -sum(optax.softmax_cross_entropy_with_integer_labels(block, digits[..., i])
              for i, block in enumerate(split_digits(logits, factors)))


def sample_codes(keys: jax.Array, logits: jax.Array, temperature: float, top_k: int = 0,
                 top_p: float = 1.0, factors: tuple[int, ...] | None = None) -> jax.Array:
  """One code per row of ``[B, ..., Σ factors]`` logits: each digit from softmax(logits /
  temperature) after filtering; temperature 0 takes the most likely one. Sample ``b``'s codes
  are drawn from ``keys[b]`` alone (:mod:`vqvdm_jax.row_random`)."""
  factors = factors or (logits.shape[-1],)
  digits = []
  for i, block in enumerate(split_digits(logits, factors)):
    block = filter_logits(block, top_k, top_p)
    if temperature == 0:
      digits.append(jnp.argmax(block, axis=-1))
    else:
      digits.append(row_random.categorical(row_random.fold_in(keys, i), block / temperature))
  if len(factors) == 1:
    return digits[0].astype(jnp.int32)
  return digits_to_codes(jnp.stack(digits, axis=-1), factors)


def extend_by_sliding_window(draw_window, codes: jax.Array, num_frames: int) -> jax.Array:
  """Codes of ``num_frames`` latent frames from a prior trained on ``t`` (Taming's sliding
  attention window, TATS §3.3's extension in time): each further frame is drawn with the last
  ``t - 1`` frames as the given codes of a trained-length window.

  ``codes [B, t, h, w]``: the first window; ``draw_window(prompt [B, t·h·w], index)`` returns a
  window's codes whose first ``(t - 1)·h·w`` are the prompt's. Returns ``[B, num_frames, h, w]``.
  """
  batch, frames, height, width = codes.shape
  if num_frames <= frames:
    return codes[:, :num_frames]
  video = jnp.zeros((batch, num_frames, height, width), codes.dtype)
  video = jax.lax.dynamic_update_slice(video, codes, (0, 0, 0, 0))

  def next_frame(index, video):
    context = jax.lax.dynamic_slice(video, (0, index - frames + 1, 0, 0),
                                    (batch, frames, height, width))
    window = draw_window(context.reshape(batch, -1), index).reshape(context.shape)
    return jax.lax.dynamic_update_slice(video, window[:, -1:], (0, index, 0, 0))

  return jax.lax.fori_loop(frames, num_frames, next_frame, video)
