"""Per-video random keys: every random draw of a sampler is made row by row, from that row's key.

A sampled video's randomness comes from its own key, ``fold_in(PRNGKey(seed), i)`` for the
video at position ``i`` of a request (:func:`video_keys`), never from a key shared by its
batch. So a video depends on the seed, its index, its conditioning and the sampler settings
only: not on the sampling batch size, the number of devices, or the rows padded onto the last
batch. The samplers (diffusion and token priors) take ``keys [B]`` (raw ``uint32`` keys,
``[B, 2]`` for threefry, split over the batch axes like the labels) and draw with the functions
below, each a ``jax.vmap`` of the ``jax.random`` function of the same name over the rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def video_keys(seed: int, start: int, count: int) -> jax.Array:
  """The keys of the videos at positions ``start .. start + count - 1`` of a request:
  ``fold_in(PRNGKey(seed), i)`` each."""
  positions = jnp.arange(start, start + count, dtype=jnp.uint32)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(seed), positions)


def fold_in(keys: jax.Array, data: int | jax.Array) -> jax.Array:
  """``fold_in(keys[b], data)`` for every row ``b``: the same (scalar) datum into each key."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def split(keys: jax.Array, num: int = 2) -> jax.Array:
  """``num`` keys of each row ``[num, B]``, so ``first, second = split(keys)`` unpacks."""
  return jnp.swapaxes(jax.vmap(lambda key: jax.random.split(key, num))(keys), 0, 1)


def normal(keys: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Standard normals ``[B, *shape]``, row ``b`` from ``keys[b]`` alone."""
  return jax.vmap(lambda key: jax.random.normal(key, tuple(shape), dtype))(keys)


def gumbel(keys: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Standard Gumbel noise ``[B, *shape]``, row ``b`` from ``keys[b]`` alone."""
  return jax.vmap(lambda key: jax.random.gumbel(key, tuple(shape)))(keys)


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
  """One draw from softmax(``logits``) over the last axis of each row of ``logits [B, ...]``,
  row ``b`` from ``keys[b]`` alone."""
  return jax.vmap(lambda key, row: jax.random.categorical(key, row, axis=-1))(keys, logits)
