"""The autoregressive prior (Taming Transformers §3.2; TATS §3.2 for video): a decoder-only
transformer over the raster-ordered (t, h, w) codes, trained by next-code cross-entropy

  L = -E Σ_i log p(x_i | x_<i, c, f),

and sampled one code at a time in one compiled loop with a key/value cache. Frame-conditioned
generation (video prediction) caches the codes of the given latent frames first and continues.

Over a two-level tokenizer (VQ-VAE-2 Algorithm 2) the sequence is all top codes, then all bottom
codes, so every bottom code is drawn given the whole top level: one loop per level, each drawing
from its level's head.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from vqvdm_jax import row_random
from vqvdm_jax.models.transformer import TokenTransformer
from vqvdm_jax.priors import model as prior_model

PyTree = Any


def next_token_loss(logits: jax.Array | tuple[jax.Array, ...], codes: jax.Array,
                    factors: Any = None) -> jax.Array:
  """Taming eq. (8): mean negative log-likelihood of each code given the previous ones.

  ``logits [B, L, V]`` from the teacher-forced forward pass (``[B, L, Σ factors]`` for
  factorised codes; two levels: one array per level and per-level ``factors``), ``codes [B, L]``.
  """
  return -jnp.mean(prior_model.sequence_log_probability(logits, codes, factors))


def sample(model: TokenTransformer, params: PyTree, labels: jax.Array, fps: jax.Array,
           keys: jax.Array, *, null: int, guidance_scale: float = 1.0, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, prompt: jax.Array | None = None,
           num_prompt_codes: int = 0) -> jax.Array:
  """Codes ``[B, L]`` drawn one at a time: ancestral sampling with a key/value cache.

  ``model`` is the ``decode=True`` transformer. The first ``num_prompt_codes`` codes come from
  ``prompt [B, L]`` (the given latent frames, raster order) and are never changed; the class and
  FPS prefix and those codes are cached in one pass, then ``lax.fori_loop`` draws each next code
  from the guided, temperature-scaled, top-k / top-p filtered logits. Code ``i`` of sample ``b``
  is drawn from ``fold_in(keys[b], i)``, so the same key gives the same codes, whatever else is
  in the batch.
  """
  batch, length = labels.shape[0], model.num_codes
  codes = (jnp.zeros((batch, length), jnp.int32) if prompt is None
           else jnp.asarray(prompt, jnp.int32).reshape(batch, length))
  labels_in, fps_in = prior_model.with_null_class(labels, fps, null, guidance_scale)
  repeats = labels_in.shape[0] // batch

  def guided(logits):
    return prior_model.combine_guided(logits, guidance_scale)

  prefix_codes = jnp.tile(codes[:, :num_prompt_codes], (repeats, 1))
  logits, variables = model.apply({"params": params}, labels_in, fps_in, prefix_codes,
                                  method=TokenTransformer.prefill, mutable=["cache"])

  def draw(level, index, carry):
    codes, cache, logits = carry
    level_logits = logits[level] if model.num_levels > 1 else logits
    code = prior_model.sample_codes(row_random.fold_in(keys, index), level_logits, temperature,
                                    top_k, top_p, model.level_factors[level])
    codes = jax.lax.dynamic_update_slice(codes, code[:, None], (0, index))
    logits, variables = model.apply({"params": params, "cache": cache},
                                    jnp.tile(code, repeats), index, level,
                                    method=TokenTransformer.step, mutable=["cache"])
    return codes, variables["cache"], guided(logits)

  carry, start = (codes, variables["cache"], guided(logits)), 0
  for level, level_length in enumerate(model.level_lengths):  # the top level first
    carry = jax.lax.fori_loop(max(start, num_prompt_codes), start + level_length,
                              functools.partial(draw, level), carry)
    start += level_length
  return carry[0]
