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

**Two levels** (VQ-VAE-2's tokenizer, Algorithm 2's prior; ``top_grid`` set): one transformer
over the sequence ``[top codes; bottom codes]``, each level raster-ordered. The top level has its
own code embedding (its quantizer and vocabulary may differ from the bottom's), its own t/h/w
position tables and its own output head (``top_*`` parameters beside the one-level names, which
keep meaning the bottom level). Per-level position tables also tell the levels apart, so no
separate level embedding is needed (it would add one constant to a level's table). Causal, every
bottom code attends to all top codes: ``p(bottom | top)`` is Algorithm 2's conditioning, and one
network instead of two shares what the levels have in common. Logits are then one array per level
``(top [B, L_top, V_top], bottom [B, L, V])``. Without ``top_grid`` nothing of this exists: the
one-level parameter tree and outputs are unchanged.
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
  # The top level of a two-level tokenizer, first in the sequence; () for one level.
  top_grid: tuple[int, ...] = ()
  top_vocab_size: int = 0
  top_factors: tuple[int, ...] = ()

  @property
  def code_factors(self) -> tuple[int, ...]:
    return tuple(self.factors) or (self.vocab_size,)

  @property
  def num_levels(self) -> int:
    return 2 if self.top_grid else 1

  @property
  def level_lengths(self) -> tuple[int, ...]:
    """Codes of each level in sequence order: ``(L_top, L_bottom)`` or ``(L,)``."""
    bottom = math.prod(self.grid)
    return (math.prod(self.top_grid), bottom) if self.top_grid else (bottom,)

  @property
  def level_factors(self) -> tuple[tuple[int, ...], ...]:
    """Each level's digit radices, in sequence order."""
    if not self.top_grid:
      return (self.code_factors,)
    return (tuple(self.top_factors) or (self.top_vocab_size,), self.code_factors)

  @property
  def num_codes(self) -> int:
    """The sequence length: every level's codes."""
    return sum(self.level_lengths)

  @property
  def mask_token(self) -> int:
    """The ``[MASK]`` input of the bidirectional model (MaskGIT); never predicted. Two levels:
    the bottom level's (each level's is its vocabulary size, :attr:`mask_tokens`)."""
    return self.vocab_size

  @property
  def mask_tokens(self) -> jax.Array:
    """``[L]``: the ``[MASK]`` input at each position of the sequence."""
    vocabularies = (self.top_vocab_size, self.vocab_size) if self.top_grid else (self.vocab_size,)
    return jnp.concatenate([jnp.full((length,), vocabulary, jnp.int32) for length, vocabulary
                            in zip(self.level_lengths, vocabularies, strict=True)])

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} does not split into {self.num_heads} heads.")
    prefixes = ("top_", "") if self.top_grid else ("",)  # '': the one-level names (bottom)
    self.code_embedders = [self._code_embedder(prefix, factors)
                           for prefix, factors in zip(prefixes, self.level_factors, strict=True)]
    self.class_embedding = nn.Embed(self.num_classes + 1, self.width,
                                    embedding_init=EMBEDDING_INIT)
    if self.use_fps:
      self.fps_embedding = EmbeddingMLP(self.width, self.dtype)
    else:
      self.fps_token = self.param("fps_token", EMBEDDING_INIT, (self.width,))
    grids = (self.top_grid, self.grid) if self.top_grid else (self.grid,)
    self.position_tables = [self._position_tables(prefix, grid)
                            for prefix, grid in zip(prefixes, grids, strict=True)]
    self.position_prefix = self.param("position_prefix", EMBEDDING_INIT,
                                      (PREFIX_LENGTH, self.width))
    block = nn.remat(TransformerBlock, static_argnums=(3,)) if self.remat else TransformerBlock
    self.blocks = [block(self.num_heads, self.mlp_ratio, self.dropout, self.causal,
                         PREFIX_LENGTH + self.num_codes, self.decode, self.dtype,
                         self.attention_impl, name=f"block_{i}") for i in range(self.depth)]
    self.embedding_dropout = nn.Dropout(self.dropout)
    self.norm = nn.LayerNorm(dtype=self.dtype)
    self.head = nn.Dense(sum(self.code_factors), dtype=self.dtype)  # one softmax per digit
    if self.top_grid:
      self.top_head = nn.Dense(sum(self.level_factors[0]), dtype=self.dtype)

  def _code_embedder(self, prefix: str, factors: tuple[int, ...]) -> dict:
    """A level's input embedding: one table (+ [MASK]), or one per digit (+ a [MASK] vector).
    ``prefix`` '' keeps the one-level parameter names."""
    if len(factors) == 1:
      num_inputs = factors[0] + (0 if self.causal else 1)
      return {"table": nn.Embed(num_inputs, self.width, embedding_init=EMBEDDING_INIT,
                                name=f"{prefix}code_embedding")}
    embedder = {"digits": [nn.Embed(factor, self.width, embedding_init=EMBEDDING_INIT,
                                    name=f"{prefix}digit_embedding_{i}")
                           for i, factor in enumerate(factors)]}
    if not self.causal:
      embedder["mask"] = self.param(f"{prefix}mask_embedding", EMBEDDING_INIT, (self.width,))
    return embedder

  def _position_tables(self, prefix: str, grid: tuple[int, ...]) -> tuple[jax.Array, ...]:
    return tuple(self.param(f"{prefix}position_{axis}", EMBEDDING_INIT, (size, self.width))
                 for axis, size in zip("thw", grid, strict=True))

  def embed_codes(self, codes: jax.Array, level: int = -1) -> jax.Array:
    """codes ``[B, n]`` of one level (indices, or its mask token) -> ``[B, n, D]``; ``level``
    in sequence order (-1: the bottom, the only one of a one-level model)."""
    embedder, factors = self.code_embedders[level], self.level_factors[level]
    if len(factors) == 1:
      return embedder["table"](codes)
    digits = code_digits(codes, factors)
    embedded = sum(embed(digits[..., i]) for i, embed in enumerate(embedder["digits"]))
    if not self.causal:
      mask_token = math.prod(factors)
      embedded = jnp.where((codes == mask_token)[..., None], embedder["mask"], embedded)
    return embedded

  def code_positions(self, level: int = -1) -> jax.Array:
    """``[L_level, D]``: position_t[i] + position_h[j] + position_w[k] in raster (t, h, w)
    order."""
    position_t, position_h, position_w = self.position_tables[level]
    table = position_t[:, None, None] + position_h[None, :, None] + position_w[None, None, :]
    return table.reshape(-1, self.width)

  def embed_sequence(self, codes: jax.Array) -> jax.Array:
    """codes ``[B, k]``, the first ``k`` of the sequence (all levels) -> ``[B, k, D]`` with
    positions."""
    embedded, start = [], 0
    for level, length in enumerate(self.level_lengths):
      part = codes[:, start:start + length]
      if part.shape[1]:
        embedded.append(self.embed_codes(part, level)
                        + self.code_positions(level)[:part.shape[1]])
      start += length
    return jnp.concatenate(embedded, axis=1)

  def level_logits(self, features: jax.Array) -> jax.Array | tuple[jax.Array, ...]:
    """Features ``[B, L, D]`` of the whole sequence -> logits: one array (one level) or one per
    level, each from its own head."""
    if not self.top_grid:
      return self.head(features).astype(jnp.float32)
    top_length = self.level_lengths[0]
    return (self.top_head(features[:, :top_length]).astype(jnp.float32),
            self.head(features[:, top_length:]).astype(jnp.float32))

  def all_heads(self, features: jax.Array) -> jax.Array | tuple[jax.Array, ...]:
    """Features ``[B, D]`` of one position -> every level's logits (decoding: which level comes
    next is known to the sampler, not here)."""
    if not self.top_grid:
      return self.head(features).astype(jnp.float32)
    return (self.top_head(features).astype(jnp.float32), self.head(features).astype(jnp.float32))

  def prefix(self, labels: jax.Array, fps: jax.Array) -> jax.Array:
    """The conditioning tokens ``[B, 2, D]``: class (or null class), then frame rate."""
    class_token = self.class_embedding(labels)
    if self.use_fps:
      fps_token = self.fps_embedding(fps)
    else:
      fps_token = jnp.broadcast_to(self.fps_token, class_token.shape)
    return jnp.stack([class_token, fps_token.astype(class_token.dtype)], axis=1) \
        + self.position_prefix

  def _features(self, h: jax.Array, start: jax.Array | int, train: bool) -> jax.Array:
    h = self.embedding_dropout(h, deterministic=not train).astype(self.dtype)
    for block in self.blocks:
      h = block(h, start, train)
    return self.norm(h)

  def __call__(self, codes: jax.Array, labels: jax.Array, fps: jax.Array,
               train: bool = False) -> jax.Array | tuple[jax.Array, ...]:
    """codes ``[B, L]`` (masked ones = :attr:`mask_tokens` when bidirectional) -> ``[B, L, V]``
    (two levels: ``([B, L_top, V_top], [B, L_bottom, V])``).

    Causal: ``logits[:, i]`` is ``p(x_i | x_<i, class, fps)`` (teacher forcing).
    """
    inputs = codes[:, :-1] if self.causal else codes
    h = jnp.concatenate([self.prefix(labels, fps), self.embed_sequence(inputs)], axis=1)
    features = self._features(h, 0, train)
    return self.level_logits(features[:, PREFIX_LENGTH - 1:] if self.causal
                             else features[:, PREFIX_LENGTH:])

  def prefill(self, labels: jax.Array, fps: jax.Array, prompt: jax.Array
              ) -> jax.Array | tuple[jax.Array, ...]:
    """Decoding: caches ``[class, fps, x_0..x_{k-1}]`` (prompt ``[B, k]``, k >= 0) and returns
    the logits ``[B, V]`` of ``x_k`` (two levels: each level's head's, ``([B, V_top], [B, V])``).
    """
    h = self.prefix(labels, fps)
    if prompt.shape[1]:
      h = jnp.concatenate([h, self.embed_sequence(prompt)], axis=1)
    return self.all_heads(self._features(h, 0, False)[:, -1])

  def step(self, code: jax.Array, index: jax.Array, level: int = -1
           ) -> jax.Array | tuple[jax.Array, ...]:
    """Decoding: caches code ``x_index`` ([B]) of ``level`` (static; ``index`` counts the whole
    sequence) and returns the logits of the next code as :meth:`prefill` does."""
    offset = sum(self.level_lengths[:level % self.num_levels])
    position = jax.lax.dynamic_index_in_dim(self.code_positions(level), index - offset,
                                            keepdims=False)
    h = (self.embed_codes(code, level) + position)[:, None]
    return self.all_heads(self._features(h, PREFIX_LENGTH + index, False)[:, 0])
