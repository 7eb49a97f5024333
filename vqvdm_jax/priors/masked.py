"""The masked prior (MaskGIT, Chang et al. 2022; MAGVIT for video): a bidirectional transformer
trained to predict masked codes, with the mask ratio drawn from the cosine schedule

  γ(r) = cos(π r / 2),  r ~ U[0, 1),  ⌈γ(r) · L⌉ codes masked  (MaskGIT §3.2, eq. 1),

and sampled by iterative parallel decoding (MaskGIT §3.3, Algorithm 1): in each of N steps
every masked code is predicted, the most confident predictions are kept and the rest masked
again, so that γ((s + 1) / N) of the free codes remain masked after step s and none after N.
Confidences get Gumbel noise whose temperature anneals linearly to 0 (MaskGIT's choice
temperature). Given (conditioning) codes are never masked and never changed.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqvdm_jax.models.transformer import TokenTransformer
from vqvdm_jax.priors import model as prior_model

PyTree = Any


def cosine_mask_ratio(r: jax.Array | float) -> jax.Array:
  """MaskGIT's mask scheduling function γ(r) = cos(π r / 2): 1 at r = 0, 0 at r = 1."""
  return jnp.cos(jnp.pi * jnp.asarray(r, jnp.float32) / 2)


def random_token_mask(rng: jax.Array, batch: int, length: int) -> jax.Array:
  """Training masks ``[B, L]`` (True = masked): per clip ⌈γ(r) L⌉ (at least one) random codes."""
  ratio_rng, order_rng = jax.random.split(rng)
  ratio = cosine_mask_ratio(jax.random.uniform(ratio_rng, (batch, 1)))
  count = jnp.clip(jnp.ceil(ratio * length), 1, length)
  scores = jax.random.uniform(order_rng, (batch, length))
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  return ranks < count


def masked_token_loss(logits: jax.Array, codes: jax.Array, mask: jax.Array,
                      factors: tuple[int, ...] | None = None) -> jax.Array:
  """MaskGIT eq. (2): the negative log-likelihood of the masked codes, averaged over them
  (``factors``: MAGVIT-v2's factorised codes, the sum over their digits)."""
  nll = -prior_model.code_log_probability(logits, codes, factors)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)


def masked_counts(num_free: int, num_steps: int) -> np.ndarray:
  """How many of ``num_free`` codes are still masked after each decoding step: ⌊γ((s+1)/N)
  num_free⌋, at least one fewer than before each step, at least one until the last, 0 after it.
  """
  counts, previous = [], num_free
  for step in range(num_steps):
    count = math.floor(num_free * math.cos(math.pi / 2 * (step + 1) / num_steps))
    count = 0 if step == num_steps - 1 else max(0, min(max(count, 1), previous - 1))
    counts.append(count)
    previous = count
  return np.asarray(counts, np.int32)


def sample(model: TokenTransformer, params: PyTree, labels: jax.Array, fps: jax.Array,
           rng: jax.Array, *, null: int, guidance_scale: float = 1.0, temperature: float = 1.0,
           num_steps: int = 12, choice_temperature: float = 4.5,
           prompt: jax.Array | None = None, num_prompt_codes: int = 0,
           return_history: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Codes ``[B, L]`` by MaskGIT's iterative decoding in ``num_steps`` steps (a ``lax.scan``).

  The first ``num_prompt_codes`` codes are taken from ``prompt [B, L]`` and stay fixed. With
  ``return_history`` also the codes after every step ``[N, B, L]`` (masked = the mask token).
  """
  batch, length, mask_token = labels.shape[0], model.num_codes, model.mask_token
  fixed = jnp.arange(length) < num_prompt_codes  # [L]
  start = jnp.full((batch, length), mask_token, jnp.int32)
  if prompt is not None:
    start = jnp.where(fixed, jnp.asarray(prompt, jnp.int32).reshape(batch, length), start)
  counts = jnp.asarray(masked_counts(length - num_prompt_codes, num_steps))
  labels_in, fps_in = prior_model.with_null_class(labels, fps, null, guidance_scale)
  repeats = labels_in.shape[0] // batch

  def decode_step(codes, step):
    masked = codes == mask_token
    logits = model.apply({"params": params}, jnp.tile(codes, (repeats, 1)), labels_in, fps_in)
    logits = prior_model.combine_guided(logits, guidance_scale)
    sample_rng, choice_rng = jax.random.split(jax.random.fold_in(rng, step))
    sampled = prior_model.sample_codes(sample_rng, logits, temperature,
                                       factors=model.code_factors)
    scaled = logits / temperature if temperature > 0 else logits
    log_probability = prior_model.code_log_probability(scaled, sampled, model.code_factors)
    annealed = choice_temperature * (1.0 - (step + 1) / num_steps)
    confidence = log_probability + annealed * jax.random.gumbel(choice_rng, (batch, length))
    confidence = jnp.where(masked, confidence, jnp.inf)  # known codes are never masked again
    ranks = jnp.argsort(jnp.argsort(confidence, axis=-1), axis=-1)
    codes = jnp.where(ranks < counts[step], mask_token, jnp.where(masked, sampled, codes))
    return codes, codes

  codes, history = jax.lax.scan(decode_step, start, jnp.arange(num_steps))
  return (codes, history) if return_history else codes
