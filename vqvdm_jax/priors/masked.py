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

from vqvdm_jax import row_random
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


TOP_LEVEL_RATE = 0.5  # two levels: the share of training clips that learn the top level


def two_level_token_mask(rng: jax.Array, batch: int, lengths: tuple[int, int]
                         ) -> tuple[jax.Array, jax.Array]:
  """Training masks ``(inputs, loss)`` ``[B, L_top + L_bottom]`` for level-by-level decoding:
  a clip learns the top level at rate :data:`TOP_LEVEL_RATE` (a cosine-scheduled random mask on
  the top, the bottom all masked, loss on the masked top codes) and otherwise the bottom given
  the whole top (the mask and loss on the bottom). These are the states :func:`sample` meets:
  p(top | class) and p(bottom | top, class), VQ-VAE-2 Algorithm 2's two priors in one network.
  """
  level_rng, top_rng, bottom_rng = jax.random.split(rng, 3)
  top_length, bottom_length = lengths
  learns_top = jax.random.uniform(level_rng, (batch, 1)) < TOP_LEVEL_RATE
  top = random_token_mask(top_rng, batch, top_length) & learns_top
  bottom = random_token_mask(bottom_rng, batch, bottom_length)
  inputs = jnp.concatenate([top, bottom | learns_top], axis=1)
  loss = jnp.concatenate([top, bottom & ~learns_top], axis=1)
  return inputs, loss


def masked_token_loss(logits: jax.Array | tuple[jax.Array, ...], codes: jax.Array,
                      mask: jax.Array, factors: Any = None) -> jax.Array:
  """MaskGIT eq. (2): the negative log-likelihood of the masked codes, averaged over them
  (``factors``: MAGVIT-v2's factorised codes, the sum over their digits; two levels: one logits
  array per level and per-level ``factors``)."""
  nll = -prior_model.sequence_log_probability(logits, codes, factors)
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
           keys: jax.Array, *, null: int, guidance_scale: float = 1.0, temperature: float = 1.0,
           num_steps: int = 12, choice_temperature: float = 4.5,
           prompt: jax.Array | None = None, num_prompt_codes: int = 0,
           return_history: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Codes ``[B, L]`` by MaskGIT's iterative decoding in ``num_steps`` steps (a ``lax.scan``).

  The first ``num_prompt_codes`` codes are taken from ``prompt [B, L]`` and stay fixed. With
  ``return_history`` also the codes after every step ``[N, B, L]`` (masked = the mask token).
  Sample ``b``'s draws and choice noise at step ``s`` come from ``fold_in(keys[b], s)`` alone.

  Two levels (VQ-VAE-2 Algorithm 2): ``num_steps`` steps decode the top level while the bottom
  stays fully masked, then ``num_steps`` more the bottom level given the whole top (each level
  on its own cosine schedule; ``2N`` steps in one scan). Decoding both at once would draw bottom
  codes before the top codes they are encoded from are known; level by level, each step is a
  state :func:`two_level_token_mask` trains on.
  """
  batch, length = labels.shape[0], model.num_codes
  mask_tokens = model.mask_tokens  # [L]
  fixed = jnp.arange(length) < num_prompt_codes  # [L]
  start = jnp.broadcast_to(mask_tokens, (batch, length))
  if prompt is not None:
    start = jnp.where(fixed, jnp.asarray(prompt, jnp.int32).reshape(batch, length), start)
  # Per step: how many of its level's free codes stay masked, which positions it decodes and
  # its step within the level (for the annealing).
  counts, active, level_steps, begin = [], [], [], 0
  for level_length in model.level_lengths:
    free = max(0, begin + level_length - max(begin, num_prompt_codes))
    counts.append(masked_counts(free, num_steps))
    in_level = (np.arange(length) >= begin) & (np.arange(length) < begin + level_length)
    active.append(np.broadcast_to(in_level, (num_steps, length)))
    level_steps.append(np.arange(num_steps))
    begin += level_length
  schedule = (jnp.arange(num_steps * model.num_levels), jnp.asarray(np.concatenate(counts)),
              jnp.asarray(np.concatenate(active)), jnp.asarray(np.concatenate(level_steps)))
  labels_in, fps_in = prior_model.with_null_class(labels, fps, null, guidance_scale)
  repeats = labels_in.shape[0] // batch
  factors = model.level_factors

  def decode_step(codes, schedule_step):
    step, count, active, level_step = schedule_step
    masked = codes == mask_tokens
    logits = model.apply({"params": params}, jnp.tile(codes, (repeats, 1)), labels_in, fps_in)
    logits = prior_model.combine_guided(logits, guidance_scale)
    sample_keys, choice_keys = row_random.split(row_random.fold_in(keys, step))
    if model.num_levels == 1:
      sampled = prior_model.sample_codes(sample_keys, logits, temperature, factors=factors[0])
    else:  # each level from its own head
      sampled = jnp.concatenate([prior_model.sample_codes(
          row_random.fold_in(sample_keys, level), level_logits, temperature,
          factors=factors[level]) for level, level_logits in enumerate(logits)], axis=1)
    scaled = jax.tree.map(lambda x: x / temperature if temperature > 0 else x, logits)
    log_probability = prior_model.sequence_log_probability(scaled, sampled, factors)
    annealed = choice_temperature * (1.0 - (level_step + 1) / num_steps)
    confidence = log_probability + annealed * row_random.gumbel(choice_keys, (length,))
    decoded = masked & active  # this step's candidates; other levels' masked codes wait
    confidence = jnp.where(decoded, confidence, jnp.inf)  # known codes are never masked again
    ranks = jnp.argsort(jnp.argsort(confidence, axis=-1), axis=-1)
    codes = jnp.where(ranks < count, mask_tokens, jnp.where(decoded, sampled, codes))
    return codes, codes

  codes, history = jax.lax.scan(decode_step, start, schedule)
  return (codes, history) if return_history else codes
