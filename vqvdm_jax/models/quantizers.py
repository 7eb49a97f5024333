"""Quantizers of the tokenizer: codebook VQ, VQ-VAE-2 EMA VQ, MAGVIT-v2 lookup-free (LFQ) and
finite scalar quantization (FSQ, Mentzer et al. 2023).

All four map ``z [..., c]`` (any leading shape, e.g. ``[B, t, h, w, c]``) to a
:class:`QuantizerOutput`; distances, losses and statistics are computed in float32.

Variables (what the caller must carry):

- ``params``: only ``'vq'`` has one, ``codebook [K, c]``, learned by the codebook loss.
- ``quantizer_state`` (every kind; not trained by gradients):
  ``step`` (int32 counter of training calls), ``last_used_step [K]`` (int32, ``NEVER_USED`` at
  start), and per kind: ``'vq'`` ``restart_offset [K, c]``; ``'ema'`` ``codebook [K, c]``,
  ``cluster_size [K]``, ``embed_sum [K, c]``.

The ``'vq'`` codebook in use is ``params['codebook'] + quantizer_state['restart_offset']``.
The offset is zero until a dead code is restarted; a restart sets the row's offset to
``z_sample - params['codebook'][i]``, so the code becomes the batch vector at once, and the param
row keeps learning from there (gradients w.r.t. the sum equal those w.r.t. the param). This keeps
every mutation inside ``quantizer_state``: the trainer never writes params back.

Caller protocol::

  variables = quantizer.init({'params': key}, z)            # train=False at init
  out, updates = quantizer.apply(variables, z, train=True, mutable=['quantizer_state'],
                                 rngs={'quantizer': key})  # rng only if dead_code_restart
  variables = {**variables, **updates}                      # store the new quantizer_state
  out = quantizer.apply(variables, z)                       # eval: nothing mutable, no rng

State is updated only when ``train=True`` (never during ``init``). Under ``jax.grad`` return the
updates as the auxiliary output; they carry no gradient (z is stop-gradiented before any update).
"""

from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

STATE = "quantizer_state"
# "Never used" is far in the past, so usage counts it as unused; not int32 min, so that
# `step - last_used_step` cannot overflow.
NEVER_USED = -(2**30)
# Full float32 matmuls: near-tie assignments must not flip under TF32 / bf16 passes.
_HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class QuantizerOutput:
  quantized: jax.Array  # [..., c] forward = code vectors, gradient flows to z (straight-through)
  indices: jax.Array  # [...] int32
  loss: jax.Array  # scalar, already weighted
  terms: dict[str, jax.Array]  # unweighted scalars for logging
  stats: dict[str, jax.Array]  # perplexity, usage


# ---------------------------------------------------------------- equations as functions


def nearest_code_indices(z_flat: jax.Array, codebook: jax.Array) -> jax.Array:
  """VQ-VDM §3.1 quantizer: argmin_k ||z - e_k||², as ||z||² - 2 z·e_k + ||e_k||² (one matmul).

  ``z_flat [N, c]``, ``codebook [K, c]`` -> ``[N]`` int32.
  """
  z_flat = z_flat.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  distances = (jnp.sum(z_flat**2, axis=-1, keepdims=True)
               - 2.0 * jnp.matmul(z_flat, codebook.T, precision=_HIGHEST)
               + jnp.sum(codebook**2, axis=-1))
  return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def straight_through(z: jax.Array, codes: jax.Array) -> jax.Array:
  """Straight-through estimator (VQ-VAE): forward = codes, d(out)/dz = identity, none to codes.

  Written ``sg(codes) + (z - sg(z))`` rather than ``z + sg(codes - z)`` so the forward value is
  the code vector exactly (``z - z`` is exactly 0), not up to a rounding of ``z + (e - z)``.
  """
  return jax.lax.stop_gradient(codes) + (z - jax.lax.stop_gradient(z))


def codebook_loss(z: jax.Array, codes: jax.Array) -> jax.Array:
  """VQ-VDM eq. 2, first term: mean ||sg[z] - e||², moves the codes towards the encoder."""
  return jnp.mean((jax.lax.stop_gradient(z) - codes) ** 2)


def commitment_loss(z: jax.Array, codes: jax.Array) -> jax.Array:
  """VQ-VDM eq. 2, second term (unweighted by beta): mean ||z - sg[e]||²."""
  return jnp.mean((z - jax.lax.stop_gradient(codes)) ** 2)


def perplexity(indices: jax.Array, num_codes: int) -> jax.Array:
  """exp(entropy) of this batch's code histogram, float32: 1 = one code, K = all used evenly."""
  counts = jnp.bincount(indices.reshape(-1), length=num_codes).astype(jnp.float32)
  probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
  return jnp.exp(entropy)


def ema_codebook_update(cluster_size: jax.Array, embed_sum: jax.Array, z_flat: jax.Array,
                        one_hot: jax.Array, decay: float,
                        epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """VQ-VAE-2 EMA update of the codebook (docs/paper.md §2.2), in float32.

  N_i <- γ N_i + (1 - γ) n_i,  m_i <- γ m_i + (1 - γ) Σ_{j assigned to i} z_j,
  e_i = m_i / Ñ_i with the Laplace-smoothed size Ñ_i = (N_i + ε) / (n + K ε) · n, n = Σ_i N_i.

  ``cluster_size [K]``, ``embed_sum [K, c]``, ``z_flat [N, c]``, ``one_hot [N, K]``.
  Returns (cluster_size, embed_sum, codebook). The returned cluster size is the unsmoothed EMA
  (as in Sonnet's VectorQuantizerEMA): smoothing only keeps unused codes from dividing by ~0.
  """
  one_hot = one_hot.astype(jnp.float32)
  z_flat = z_flat.astype(jnp.float32)
  counts = jnp.sum(one_hot, axis=0)  # n_i
  sums = jnp.matmul(one_hot.T, z_flat, precision=_HIGHEST)  # Σ_j z_j over codes assigned to i
  cluster_size = decay * cluster_size + (1.0 - decay) * counts
  embed_sum = decay * embed_sum + (1.0 - decay) * sums
  total = jnp.sum(cluster_size)
  num_codes = cluster_size.shape[0]
  smoothed = (cluster_size + epsilon) / (total + num_codes * epsilon) * total
  return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def lfq_codes_from_indices(indices: jax.Array, code_dim: int) -> jax.Array:
  """MAGVIT-v2 LFQ, index = Σ_i 2^i · 1[z_i > 0] inverted: bit i of the index -> ±1 in channel i."""
  bits = (indices[..., None].astype(jnp.int32) >> jnp.arange(code_dim, dtype=jnp.int32)) & 1
  return (2 * bits - 1).astype(jnp.float32)


def lfq_indices(z: jax.Array) -> jax.Array:
  """MAGVIT-v2 LFQ: index = Σ_i 2^i · 1[z_i > 0] (z_i = 0 is bit 0, i.e. code -1)."""
  weights = 2 ** jnp.arange(z.shape[-1], dtype=jnp.int32)
  return jnp.sum(jnp.where(z > 0, weights, 0), axis=-1).astype(jnp.int32)


def _lfq_entropies(z_flat: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """(mean per-token entropy, entropy of the batch-mean distribution) over all 2^d codes.

  p(c | z) = softmax_c(-||z - c||² / T). Since ||c||² = d for every code, the logits reduce to
  2 z·c / T (the dropped terms are constant per token). Memory: an [N, 2^d] float32 matrix.
  """
  z_flat = z_flat.astype(jnp.float32)
  code_dim = z_flat.shape[-1]
  all_codes = lfq_codes_from_indices(jnp.arange(2**code_dim), code_dim)  # [2^d, d]
  logits = 2.0 * jnp.matmul(z_flat, all_codes.T, precision=_HIGHEST) / temperature
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  probs = jnp.exp(log_probs)
  per_sample_entropy = jnp.mean(-jnp.sum(probs * log_probs, axis=-1))
  mean_probs = jnp.mean(probs, axis=0)
  # Clamped log: exact where a code has mass, finite gradient where it has none.
  codebook_entropy = -jnp.sum(mean_probs * jnp.log(jnp.maximum(mean_probs, 1e-30)))
  return per_sample_entropy, codebook_entropy


def lfq_entropy_penalty(z_flat: jax.Array, temperature: float) -> jax.Array:
  """MAGVIT-v2 LFQ entropy penalty: E_z[H(p(c|z))] - H(E_z[p(c|z)]), a float32 scalar.

  <= 0 by the concavity of entropy; 0 when every token has the same distribution. Minimizing it
  makes each token confident (first term) and the batch use many codes (second term).
  """
  per_sample_entropy, codebook_entropy = _lfq_entropies(z_flat, temperature)
  return per_sample_entropy - codebook_entropy


def entropy_weight_schedule(step: jax.Array, initial: float, final: float,
                            anneal_steps: int) -> jax.Array:
  """Entropy-penalty weight, linear from ``initial`` at step 0 to ``final`` at ``anneal_steps``.

  ``anneal_steps <= 0`` means no annealing: the weight stays ``initial``.
  """
  if anneal_steps <= 0:
    return jnp.asarray(initial, jnp.float32)
  fraction = jnp.clip(jnp.asarray(step, jnp.float32) / anneal_steps, 0.0, 1.0)
  return jnp.asarray(initial + (final - initial) * fraction, jnp.float32)


def code_usage(step: jax.Array, last_used_step: jax.Array, indices: jax.Array,
               usage_window: int) -> tuple[jax.Array, jax.Array]:
  """Marks this batch's codes as used at ``step``; returns (last_used_step, usage fraction).

  usage = fraction of codes with step - last_used_step < usage_window (float32).
  """
  num_codes = last_used_step.shape[0]
  used = jnp.bincount(indices.reshape(-1), length=num_codes) > 0
  last_used_step = jnp.where(used, step, last_used_step).astype(jnp.int32)
  usage = jnp.mean(((step - last_used_step) < usage_window).astype(jnp.float32))
  return last_used_step, usage


def dead_codes(step: jax.Array, last_used_step: jax.Array, dead_code_steps: int) -> jax.Array:
  """Codes unused for >= ``dead_code_steps`` steps, counting this one ([K] bool).

  A never-used code counts as last used at step -1: at step s it has been idle for s + 1 steps,
  so restarts start only after ``dead_code_steps`` steps of training, not at the first step.
  """
  idle = step - jnp.maximum(last_used_step, -1)
  return idle >= dead_code_steps


def sample_batch_vectors(key: jax.Array, z_flat: jax.Array, num_codes: int) -> jax.Array:
  """One randomly chosen row of ``z_flat [N, c]`` per code (with replacement): ``[K, c]``."""
  choice = jax.random.randint(key, (num_codes,), 0, z_flat.shape[0])
  return jax.lax.stop_gradient(z_flat[choice]).astype(jnp.float32)


def _flatten(z: jax.Array, code_dim: int) -> jax.Array:
  if z.shape[-1] != code_dim:
    raise ValueError(f"quantizer expects {code_dim} channels (vqgan.model.latent_channels), "
                     f"got z of shape {z.shape}.")
  return z.astype(jnp.float32).reshape(-1, code_dim)


def _quantizer_output(z: jax.Array, z_flat: jax.Array, codes: jax.Array, indices: jax.Array,
                      loss: jax.Array, terms: dict[str, jax.Array], usage: jax.Array,
                      num_codes: int) -> QuantizerOutput:
  """The shared tail of every quantizer: straight-through codes in z's shape, plus stats."""
  quantized = straight_through(z_flat, codes).reshape(z.shape).astype(z.dtype)
  return QuantizerOutput(
      quantized=quantized, indices=indices.reshape(z.shape[:-1]), loss=loss, terms=terms,
      stats={"perplexity": perplexity(indices, num_codes), "usage": usage})


def _counters(module: nn.Module, num_codes: int) -> tuple[Any, Any]:
  step = module.variable(STATE, "step", lambda: jnp.zeros((), jnp.int32))
  last_used = module.variable(STATE, "last_used_step",
                              lambda: jnp.full((num_codes,), NEVER_USED, jnp.int32))
  return step, last_used


# ---------------------------------------------------------------- modules


class VectorQuantizer(nn.Module):
  """'vq': nearest codebook entry, codebook + commitment loss (VQ-VDM eq. 2).

  The codebook param is initialized N(0, codebook_init_stddev²): on the scale of the encoder's
  output, so codes start near the data; the Taming-style uniform(±1/K) puts all 16384 codes at
  the origin, where a handful win every assignment. Dead-code restart (see the module docstring)
  writes ``restart_offset`` in ``quantizer_state``.
  """

  codebook_size: int
  code_dim: int
  beta: float = 0.25
  dead_code_restart: bool = False
  dead_code_steps: int = 200
  usage_window: int = 100
  codebook_init_stddev: float = 1.0

  def setup(self):
    shape = (self.codebook_size, self.code_dim)
    self.codebook_param = self.param("codebook", nn.initializers.normal(self.codebook_init_stddev),
                                     shape, jnp.float32)
    self.restart_offset = self.variable(STATE, "restart_offset",
                                        lambda: jnp.zeros(shape, jnp.float32))
    self.step_counter, self.last_used_step = _counters(self, self.codebook_size)

  def codebook(self) -> jax.Array:
    """The codebook in use ``[K, c]``: the learned param plus any restart offset."""
    return self.codebook_param + self.restart_offset.value

  def codes_from_indices(self, indices: jax.Array) -> jax.Array:
    """``indices [...]`` -> code vectors ``[..., c]`` (float32)."""
    return jnp.take(self.codebook(), indices, axis=0)

  def nearest_codes(self, latent: jax.Array) -> jax.Array:
    """A latent in code space (e.g. a stage-2 sample) -> its nearest code vectors (float32)."""
    codebook = self.codebook()
    indices = nearest_code_indices(_flatten(latent, self.code_dim), codebook)
    return jnp.take(codebook, indices, axis=0).reshape(latent.shape)

  def __call__(self, z: jax.Array, train: bool = False) -> QuantizerOutput:
    """VQ-VDM eq. 2: L_vq = ||sg[z] - e||² + β ||z - sg[e]||² (means over elements)."""
    z_flat = _flatten(z, self.code_dim)
    codebook = self.codebook()
    indices = nearest_code_indices(z_flat, codebook)
    codes = jnp.take(codebook, indices, axis=0)
    terms = {"codebook": codebook_loss(z_flat, codes), "commitment": commitment_loss(z_flat, codes)}
    loss = terms["codebook"] + self.beta * terms["commitment"]

    step = self.step_counter.value
    last_used, usage = code_usage(step, self.last_used_step.value, indices, self.usage_window)
    if train and not self.is_initializing():
      if self.dead_code_restart:
        dead = dead_codes(step, last_used, self.dead_code_steps)
        samples = sample_batch_vectors(self.make_rng("quantizer"), z_flat, self.codebook_size)
        param = jax.lax.stop_gradient(self.codebook_param)
        # The offset makes param + offset equal the sample; the param row keeps learning.
        self.restart_offset.value = jnp.where(dead[:, None], samples - param,
                                              self.restart_offset.value)
        last_used = jnp.where(dead, step, last_used)
      self.last_used_step.value = last_used
      self.step_counter.value = step + 1

    return _quantizer_output(z, z_flat, codes, indices, loss, terms, usage, self.codebook_size)


class EMAVectorQuantizer(nn.Module):
  """'ema': VQ-VAE-2 codebook learned by exponential moving averages; loss = β · commitment.

  Codebook, cluster sizes and sums live in ``quantizer_state``. They start consistent,
  N_i = 1 and m_i = e_i (e = m / N from the first step; zero sizes would blow e up to m / ε).
  The codebook init N(0, codebook_init_stddev²) draws from the 'params' rng at ``init``.
  """

  codebook_size: int
  code_dim: int
  beta: float = 0.25
  ema_decay: float = 0.99
  ema_epsilon: float = 1e-5
  dead_code_restart: bool = False
  dead_code_steps: int = 200
  usage_window: int = 100
  codebook_init_stddev: float = 1.0

  def setup(self):
    shape = (self.codebook_size, self.code_dim)
    self.codebook = self.variable(
        STATE, "codebook",
        lambda: self.codebook_init_stddev * jax.random.normal(self.make_rng("params"), shape,
                                                              jnp.float32))
    self.cluster_size = self.variable(STATE, "cluster_size",
                                      lambda: jnp.ones((self.codebook_size,), jnp.float32))
    self.embed_sum = self.variable(STATE, "embed_sum", lambda: self.codebook.value)
    self.step_counter, self.last_used_step = _counters(self, self.codebook_size)

  def codes_from_indices(self, indices: jax.Array) -> jax.Array:
    """``indices [...]`` -> code vectors ``[..., c]`` (float32)."""
    return jnp.take(self.codebook.value, indices, axis=0)

  def nearest_codes(self, latent: jax.Array) -> jax.Array:
    """A latent in code space (e.g. a stage-2 sample) -> its nearest code vectors (float32)."""
    indices = nearest_code_indices(_flatten(latent, self.code_dim), self.codebook.value)
    return jnp.take(self.codebook.value, indices, axis=0).reshape(latent.shape)

  def __call__(self, z: jax.Array, train: bool = False) -> QuantizerOutput:
    """Quantizes with the current codebook, then (train) applies the VQ-VAE-2 EMA update."""
    z_flat = _flatten(z, self.code_dim)
    codebook = self.codebook.value
    indices = nearest_code_indices(z_flat, codebook)
    codes = jnp.take(codebook, indices, axis=0)
    terms = {"commitment": commitment_loss(z_flat, codes)}
    loss = self.beta * terms["commitment"]

    step = self.step_counter.value
    last_used, usage = code_usage(step, self.last_used_step.value, indices, self.usage_window)
    if train and not self.is_initializing():
      one_hot = jax.nn.one_hot(indices, self.codebook_size, dtype=jnp.float32)
      cluster_size, embed_sum, codebook = ema_codebook_update(
          self.cluster_size.value, self.embed_sum.value, jax.lax.stop_gradient(z_flat), one_hot,
          self.ema_decay, self.ema_epsilon)
      if self.dead_code_restart:
        dead = dead_codes(step, last_used, self.dead_code_steps)
        samples = sample_batch_vectors(self.make_rng("quantizer"), z_flat, self.codebook_size)
        # A restarted code is a fresh cluster of one token at the sample: N = 1, m = e = sample.
        codebook = jnp.where(dead[:, None], samples, codebook)
        embed_sum = jnp.where(dead[:, None], samples, embed_sum)
        cluster_size = jnp.where(dead, 1.0, cluster_size)
        last_used = jnp.where(dead, step, last_used)
      self.codebook.value = codebook
      self.cluster_size.value = cluster_size
      self.embed_sum.value = embed_sum
      self.last_used_step.value = last_used
      self.step_counter.value = step + 1

    return _quantizer_output(z, z_flat, codes, indices, loss, terms, usage, self.codebook_size)


class LookupFreeQuantizer(nn.Module):
  """'lfq': MAGVIT-v2 lookup-free quantization, code = sign(z) ∈ {-1, 1}^d, 2^d codes, no table.

  z_i = 0 maps to -1, consistent with index = Σ_i 2^i · 1[z_i > 0].
  loss = β · commitment + w(step) · entropy penalty, w annealed by the quantizer's own step.
  """

  code_dim: int
  beta: float = 0.25
  entropy_weight: float = 0.1
  entropy_weight_final: float = 0.1
  entropy_anneal_steps: int = 0
  entropy_temperature: float = 0.01
  usage_window: int = 100

  @property
  def num_codes(self) -> int:
    return 2**self.code_dim

  def setup(self):
    self.step_counter, self.last_used_step = _counters(self, self.num_codes)

  def codes_from_indices(self, indices: jax.Array) -> jax.Array:
    """``indices [...]`` -> ±1 code vectors ``[..., d]`` (float32)."""
    return lfq_codes_from_indices(indices, self.code_dim)

  def nearest_codes(self, latent: jax.Array) -> jax.Array:
    """A latent in code space -> the nearest ±1 code, sign(latent) (0 -> -1) (float32)."""
    return jnp.where(latent > 0, 1.0, -1.0).astype(jnp.float32)

  def __call__(self, z: jax.Array, train: bool = False) -> QuantizerOutput:
    """MAGVIT-v2 LFQ with the entropy penalty; commitment β ||z - sg[sign(z)]||²."""
    z_flat = _flatten(z, self.code_dim)
    indices = lfq_indices(z_flat)
    codes = jnp.where(z_flat > 0, 1.0, -1.0)
    step = self.step_counter.value
    per_sample_entropy, codebook_entropy = _lfq_entropies(z_flat, self.entropy_temperature)
    weight = entropy_weight_schedule(step, self.entropy_weight, self.entropy_weight_final,
                                     self.entropy_anneal_steps)
    terms = {"commitment": commitment_loss(z_flat, codes),
             "entropy_penalty": per_sample_entropy - codebook_entropy,
             "per_sample_entropy": per_sample_entropy, "codebook_entropy": codebook_entropy,
             "entropy_weight": weight}
    loss = self.beta * terms["commitment"] + weight * terms["entropy_penalty"]

    last_used, usage = code_usage(step, self.last_used_step.value, indices, self.usage_window)
    if train and not self.is_initializing():
      self.last_used_step.value = last_used
      self.step_counter.value = step + 1

    return _quantizer_output(z, z_flat, codes, indices, loss, terms, usage, self.num_codes)


def fsq_bound(z: jax.Array, levels: tuple[int, ...], epsilon: float = 1e-3) -> jax.Array:
  """FSQ (Mentzer et al. 2023, §3): tanh-bound channel i so that rounding gives L_i values.

  f(z) = tanh(z + s) · h - o with h = (L - 1)(1 - ε) / 2, o = 0.5 for even L (0 for odd) and
  s = tan(o / h), as in the paper's reference code: f ranges over (-h - o, h - o), so rounding
  gives the integers -⌊L/2⌋ .. ⌈L/2⌉ - 1, exactly L of them (L = 2 included, where an atanh
  shift would not exist). ``z [..., d]`` with d = len(levels), float32 out.
  """
  levels_array = jnp.asarray(levels, jnp.float32)
  half = (levels_array - 1.0) * (1.0 - epsilon) / 2.0
  offset = jnp.where(jnp.asarray(levels) % 2 == 0, 0.5, 0.0)
  shift = jnp.tan(offset / half)
  return jnp.tanh(z.astype(jnp.float32) + shift) * half - offset


def fsq_quantize(z: jax.Array, levels: tuple[int, ...]) -> jax.Array:
  """FSQ: round(f(z)) with a straight-through gradient, scaled by ⌊L/2⌋ into [-1, 1].

  Forward: the code (integer level / ⌊L/2⌋); backward: d f(z) / dz (rounding passes the
  gradient unchanged).
  """
  bounded = fsq_bound(z, levels)
  rounded = bounded + jax.lax.stop_gradient(jnp.round(bounded) - bounded)
  return rounded / jnp.asarray([level // 2 for level in levels], jnp.float32)


def fsq_indices(codes: jax.Array, levels: tuple[int, ...]) -> jax.Array:
  """FSQ code -> index, the mixed-radix number Σ_i digit_i · Π_{j<i} L_j (digit_i ∈ 0..L_i - 1).

  ``codes [..., d]`` as returned by :func:`fsq_quantize` -> ``[...]`` int32.
  """
  half_width = jnp.asarray([level // 2 for level in levels], jnp.float32)
  digits = jnp.round(codes * half_width + half_width).astype(jnp.int32)
  basis = jnp.asarray(fsq_basis(levels), jnp.int32)
  return jnp.sum(digits * basis, axis=-1).astype(jnp.int32)


def fsq_codes_from_indices(indices: jax.Array, levels: tuple[int, ...]) -> jax.Array:
  """The inverse of :func:`fsq_indices`: ``[...]`` int -> codes ``[..., d]`` float32."""
  basis = jnp.asarray(fsq_basis(levels), jnp.int32)
  levels_array = jnp.asarray(levels, jnp.int32)
  digits = (indices[..., None].astype(jnp.int32) // basis) % levels_array
  half_width = jnp.asarray([level // 2 for level in levels], jnp.float32)
  return (digits.astype(jnp.float32) - half_width) / half_width


def fsq_basis(levels: tuple[int, ...]) -> tuple[int, ...]:
  """Place values of the mixed-radix index: (1, L_0, L_0 L_1, ...)."""
  return tuple(math.prod(levels[:i]) for i in range(len(levels)))


class FiniteScalarQuantizer(nn.Module):
  """'fsq': Finite Scalar Quantization (Mentzer et al. 2023): each channel bounded and rounded.

  Channel i takes ``levels[i]`` values in [-1, 1]; the implicit codebook is their product
  (Π L_i codes, no table, nothing learned, no auxiliary loss: ``loss`` is 0). Usage and
  perplexity are tracked like the other kinds.
  """

  levels: tuple[int, ...]
  usage_window: int = 100

  @property
  def num_codes(self) -> int:
    return math.prod(self.levels)

  def setup(self):
    self.step_counter, self.last_used_step = _counters(self, self.num_codes)

  def codes_from_indices(self, indices: jax.Array) -> jax.Array:
    """``indices [...]`` -> code vectors ``[..., d]`` in [-1, 1] (float32)."""
    return fsq_codes_from_indices(indices, self.levels)

  def nearest_codes(self, latent: jax.Array) -> jax.Array:
    """A latent in code space (e.g. a stage-2 sample) -> the nearest code (float32).

    Not ``__call__``: that bounds an *encoder* output with tanh first, so it would move a code
    that is already on the grid. Here each channel is rounded to its nearest level and clipped.
    """
    _flatten(latent, len(self.levels))  # checks the channel count
    half_width = jnp.asarray([level // 2 for level in self.levels], jnp.float32)
    lowest = -half_width
    highest = jnp.asarray([level - 1 - level // 2 for level in self.levels], jnp.float32)
    steps = jnp.clip(jnp.round(latent.astype(jnp.float32) * half_width), lowest, highest)
    return steps / half_width

  def __call__(self, z: jax.Array, train: bool = False) -> QuantizerOutput:
    """Bound, round (straight-through); the code is also the quantized latent."""
    z_flat = _flatten(z, len(self.levels))
    codes = fsq_quantize(z_flat, self.levels)  # carries the straight-through gradient
    indices = fsq_indices(jax.lax.stop_gradient(codes), self.levels)
    step = self.step_counter.value
    last_used, usage = code_usage(step, self.last_used_step.value, indices, self.usage_window)
    if train and not self.is_initializing():
      self.last_used_step.value = last_used
      self.step_counter.value = step + 1
    stats = {"perplexity": perplexity(indices, self.num_codes), "usage": usage}
    zero = jnp.zeros((), jnp.float32)
    return QuantizerOutput(quantized=codes.reshape(z.shape).astype(z.dtype),
                           indices=indices.reshape(z.shape[:-1]), loss=zero, terms={},
                           stats=stats)


def num_codes(quantizer_config: Any, latent_channels: int) -> int:
  """How many distinct codes the configured quantizer has (its codebook size)."""
  if quantizer_config.kind == "lfq":
    return 2**latent_channels
  if quantizer_config.kind == "fsq":
    return math.prod(quantizer_config.fsq_levels)
  return quantizer_config.codebook_size


def make_quantizer(quantizer_config: Any, latent_channels: int) -> nn.Module:
  """Builds the quantizer named by ``config.vqgan.quantizer.kind`` for ``latent_channels``-dim z.

  ``codebook_init_stddev`` is read from the config when present (default 1.0). 'lfq' ignores
  ``codebook_size`` (2^latent_channels codes) and ``dead_code_restart`` (it has no table);
  'fsq' reads only ``fsq_levels`` (one per latent channel) and ``usage_window``.
  """
  q = quantizer_config
  init_stddev = float(q.get("codebook_init_stddev", 1.0))
  if q.kind == "vq":
    return VectorQuantizer(
        codebook_size=q.codebook_size, code_dim=latent_channels, beta=q.beta,
        dead_code_restart=q.dead_code_restart, dead_code_steps=q.dead_code_steps,
        usage_window=q.usage_window, codebook_init_stddev=init_stddev)
  if q.kind == "ema":
    return EMAVectorQuantizer(
        codebook_size=q.codebook_size, code_dim=latent_channels, beta=q.beta,
        ema_decay=q.ema_decay, ema_epsilon=q.ema_epsilon, dead_code_restart=q.dead_code_restart,
        dead_code_steps=q.dead_code_steps, usage_window=q.usage_window,
        codebook_init_stddev=init_stddev)
  if q.kind == "lfq":
    return LookupFreeQuantizer(
        code_dim=latent_channels, beta=q.beta, entropy_weight=q.entropy_weight,
        entropy_weight_final=q.entropy_weight_final,
        entropy_anneal_steps=q.entropy_anneal_steps,
        entropy_temperature=q.entropy_temperature, usage_window=q.usage_window)
  if q.kind == "fsq":
    levels = tuple(int(level) for level in q.fsq_levels)
    if len(levels) != latent_channels:
      raise ValueError(f"config.vqgan.quantizer.fsq_levels has {len(levels)} entries; FSQ needs "
                       f"one per latent channel (vqgan.model.latent_channels={latent_channels}).")
    return FiniteScalarQuantizer(levels=levels, usage_window=q.usage_window)
  raise ValueError(f"config.vqgan.quantizer.kind: got {q.kind!r}; choose 'vq', 'ema', 'lfq' or "
                   f"'fsq'.")
