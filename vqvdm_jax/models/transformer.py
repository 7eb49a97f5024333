"""The token priors' transformer over a tokenizer's code grid ``[B, t, h, w]``, raster-ordered.

One module, two attention patterns:

- ``causal=True``: a decoder-only GPT (Taming Transformers §3.2; TATS §3.2 for video). The input
  is ``[class, fps, x_0, ..., x_{L-2}]`` and the output at the position before ``x_i`` is
  ``p(x_i | x_<i, class, fps)``. With ``decode=True`` it keeps a key/value cache and runs a
  prefix (:meth:`TokenTransformer.prefill`) and then one code at a time
  (:meth:`TokenTransformer.step`).
- ``causal=False``: a bidirectional transformer (MaskGIT §3.1), input
  ``[class, fps, x_0, ..., x_{L-1}]`` where masked codes are the extra ``[MASK]`` token
  ``vocab_size``; the output at ``x_i``'s position is ``p(x_i | unmasked codes)``.

The class (or the null class of classifier-free guidance, index ``num_classes``) and the frame
rate enter as two prefix tokens. Code positions get the sum of a learned embedding per axis
(t, h, w), so the same table shape serves any raster order of the grid.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqvdm_jax.models.attention import resolve_attention_impl
from vqvdm_jax.models.unet3d import EmbeddingMLP

Dtype = Any

PREFIX_LENGTH = 2  # the class token and the FPS token
EMBEDDING_INIT = nn.initializers.normal(stddev=0.02)  # GPT-2's, as minGPT / Taming use


def code_digits(codes: jax.Array, factors: tuple[int, ...]) -> jax.Array:
  """Indices ``[...]`` -> digits ``[..., len(factors)]``: index = Σ_i d_i Π_{j<i} factors_j."""
  basis = jnp.asarray([math.prod(factors[:i]) for i in range(len(factors))], jnp.int32)
  return (codes[..., None].astype(jnp.int32) // basis) % jnp.asarray(factors, jnp.int32)


def digits_to_codes(digits: jax.Array, factors: tuple[int, ...]) -> jax.Array:
  """The inverse of :func:`code_digits`."""
  basis = jnp.asarray([math.prod(factors[:i]) for i in range(len(factors))], jnp.int32)
  return jnp.sum(digits.astype(jnp.int32) * basis, axis=-1)


class CachedSelfAttention(nn.Module):
  """Multi-head self-attention through ``jax.nn.dot_product_attention``; causal or not.

  With ``decode=True`` the keys and values of every position seen so far live in the ``cache``
  collection (``[B, max_length, heads, head_dim]``); a call writes its chunk at ``start`` and
  attends to the cache up to each query's own position.
  """

  num_heads: int
  causal: bool
  max_length: int
  decode: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    batch, length, channels = x.shape  # x [B, n, D]
    head_dim = channels // self.num_heads
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype, name="qkv")(x)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, n, heads, head_dim]
    if self.decode:
      shape = (batch, self.max_length, self.num_heads, head_dim)
      cached_key = self.variable("cache", "key", jnp.zeros, shape, key.dtype)
      cached_value = self.variable("cache", "value", jnp.zeros, shape, value.dtype)
      offsets = (0, start, 0, 0)
      key = jax.lax.dynamic_update_slice(cached_key.value, key, offsets)
      value = jax.lax.dynamic_update_slice(cached_value.value, value, offsets)
      cached_key.value, cached_value.value = key, value
      query_position = start + jnp.arange(length)
      mask = (jnp.arange(self.max_length)[None, :] <= query_position[:, None])[None, None]
      implementation = resolve_attention_impl(self.attention_impl, query.dtype, head_dim,
                                               self.max_length, True)
      out = jax.nn.dot_product_attention(query, key, value, mask=mask,
                                         implementation=implementation)
    else:
      implementation = resolve_attention_impl(self.attention_impl, query.dtype, head_dim,
                                               length, self.causal)
      out = jax.nn.dot_product_attention(query, key, value, is_causal=self.causal,
                                         implementation=implementation)
    return nn.DenseGeneral(channels, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class TransformerBlock(nn.Module):
  """Pre-LayerNorm block (GPT-2): x + attention(LN(x)), then x + MLP(LN(x)), dropout on both."""

  num_heads: int
  mlp_ratio: float
  dropout: float
  causal: bool
  max_length: int
  decode: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, start: jax.Array | int = 0, train: bool = False
               ) -> jax.Array:
    width = x.shape[-1]
    attention = CachedSelfAttention(self.num_heads, self.causal, self.max_length, self.decode,
                                    self.dtype, self.attention_impl, name="attention")
    h = attention(nn.LayerNorm(dtype=self.dtype, name="norm_1")(x), start)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.LayerNorm(dtype=self.dtype, name="norm_2")(x)
    h = nn.gelu(nn.Dense(int(self.mlp_ratio * width), dtype=self.dtype, name="mlp_in")(h))
    h = nn.Dense(width, dtype=self.dtype, name="mlp_out")(h)
    return x + nn.Dropout(self.dropout, deterministic=not train)(h)


class TokenTransformer(nn.Module):
  """Logits ``[B, L, Σ factors]`` (``[B, L, vocab_size]`` for a plain vocabulary) over the
  ``L = t·h·w`` codes of a grid, given class and FPS."""

  vocab_size: int  # codes; with `factors`, their product
  num_classes: int  # the class table has num_classes + 1 rows: the last is the null class
  grid: tuple[int, int, int]  # (t, h, w) of the code grid
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  causal: bool = True
  use_fps: bool = True
  decode: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"
  remat: bool = False
  # MAGVIT-v2's token factorisation: a code is the digits (d_0, d_1, ...) of its index in these
  # radices (least significant first: LFQ bits, FSQ channel levels); each digit has its own input
  # embedding (summed) and its own softmax. () or one factor: a plain vocabulary.
  factors: tuple[int, ...] = ()

  @property
  def code_factors(self) -> tuple[int, ...]:
    return tuple(self.factors) or (self.vocab_size,)

  @property
  def num_codes(self) -> int:
    return math.prod(self.grid)

  @property
  def mask_token(self) -> int:
    """The ``[MASK]`` input of the bidirectional model (MaskGIT); never predicted."""
    return self.vocab_size

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} does not split into {self.num_heads} heads.")
    if len(self.code_factors) == 1:
      num_inputs = self.vocab_size + (0 if self.causal else 1)
      self.code_embedding = nn.Embed(num_inputs, self.width, embedding_init=EMBEDDING_INIT)
    else:
      self.digit_embeddings = [nn.Embed(factor, self.width, embedding_init=EMBEDDING_INIT,
                                        name=f"digit_embedding_{i}")
                               for i, factor in enumerate(self.code_factors)]
      if not self.causal:
        self.mask_embedding = self.param("mask_embedding", EMBEDDING_INIT, (self.width,))
    self.class_embedding = nn.Embed(self.num_classes + 1, self.width,
                                    embedding_init=EMBEDDING_INIT)
    if self.use_fps:
      self.fps_embedding = EmbeddingMLP(self.width, self.dtype)
    else:
      self.fps_token = self.param("fps_token", EMBEDDING_INIT, (self.width,))
    frames, height, width = self.grid
    self.position_t = self.param("position_t", EMBEDDING_INIT, (frames, self.width))
    self.position_h = self.param("position_h", EMBEDDING_INIT, (height, self.width))
    self.position_w = self.param("position_w", EMBEDDING_INIT, (width, self.width))
    self.position_prefix = self.param("position_prefix", EMBEDDING_INIT,
                                      (PREFIX_LENGTH, self.width))
    block = nn.remat(TransformerBlock, static_argnums=(3,)) if self.remat else TransformerBlock
    self.blocks = [block(self.num_heads, self.mlp_ratio, self.dropout, self.causal,
                         PREFIX_LENGTH + self.num_codes, self.decode, self.dtype,
                         self.attention_impl, name=f"block_{i}") for i in range(self.depth)]
    self.embedding_dropout = nn.Dropout(self.dropout)
    self.norm = nn.LayerNorm(dtype=self.dtype)
    self.head = nn.Dense(sum(self.code_factors), dtype=self.dtype)  # one softmax per digit

  def embed_codes(self, codes: jax.Array) -> jax.Array:
    """codes ``[B, n]`` (indices, or the mask token) -> ``[B, n, D]``."""
    if len(self.code_factors) == 1:
      return self.code_embedding(codes)
    digits = code_digits(codes, self.code_factors)
    embedded = sum(embed(digits[..., i]) for i, embed in enumerate(self.digit_embeddings))
    if not self.causal:
      embedded = jnp.where((codes == self.mask_token)[..., None], self.mask_embedding, embedded)
    return embedded

  def code_positions(self) -> jax.Array:
    """``[L, D]``: position_t[i] + position_h[j] + position_w[k] in raster (t, h, w) order."""
    table = (self.position_t[:, None, None] + self.position_h[None, :, None]
             + self.position_w[None, None, :])
    return table.reshape(self.num_codes, self.width)

  def prefix(self, labels: jax.Array, fps: jax.Array) -> jax.Array:
    """The conditioning tokens ``[B, 2, D]``: class (or null class), then frame rate."""
    class_token = self.class_embedding(labels)
    if self.use_fps:
      fps_token = self.fps_embedding(fps)
    else:
      fps_token = jnp.broadcast_to(self.fps_token, class_token.shape)
    return jnp.stack([class_token, fps_token.astype(class_token.dtype)], axis=1) \
        + self.position_prefix

  def _transform(self, h: jax.Array, start: jax.Array | int, train: bool) -> jax.Array:
    h = self.embedding_dropout(h, deterministic=not train).astype(self.dtype)
    for block in self.blocks:
      h = block(h, start, train)
    return self.head(self.norm(h)).astype(jnp.float32)

  def __call__(self, codes: jax.Array, labels: jax.Array, fps: jax.Array,
               train: bool = False) -> jax.Array:
    """codes ``[B, L]`` (masked ones = :attr:`mask_token` when bidirectional) -> ``[B, L, V]``.

    Causal: ``logits[:, i]`` is ``p(x_i | x_<i, class, fps)`` (teacher forcing).
    """
    positions = self.code_positions()
    inputs = codes[:, :-1] if self.causal else codes
    h = self.embed_codes(inputs) + positions[:inputs.shape[1]]
    h = jnp.concatenate([self.prefix(labels, fps), h], axis=1)
    logits = self._transform(h, 0, train)
    return logits[:, PREFIX_LENGTH - 1:] if self.causal else logits[:, PREFIX_LENGTH:]

  def prefill(self, labels: jax.Array, fps: jax.Array, prompt: jax.Array) -> jax.Array:
    """Decoding: caches ``[class, fps, x_0..x_{k-1}]`` (prompt ``[B, k]``, k >= 0) and returns
    the logits ``[B, V]`` of ``x_k``."""
    h = self.prefix(labels, fps)
    if prompt.shape[1]:
      embedded = self.embed_codes(prompt) + self.code_positions()[:prompt.shape[1]]
      h = jnp.concatenate([h, embedded], axis=1)
    return self._transform(h, 0, False)[:, -1]

  def step(self, code: jax.Array, index: jax.Array) -> jax.Array:
    """Decoding: caches code ``x_index`` ([B]) and returns the logits ``[B, V]`` of the next."""
    position = jax.lax.dynamic_index_in_dim(self.code_positions(), index, keepdims=False)
    h = (self.embed_codes(code) + position)[:, None]
    return self._transform(h, PREFIX_LENGTH + index, False)[:, 0]
