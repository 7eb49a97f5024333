"""The optimizer both stages share: Adam(W) with warm-up, optional cosine decay and clipping."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def warmup_schedule(learning_rate: float, warmup_steps: int, decay: str = "constant",
                    total_steps: int = 0, final_fraction: float = 0.0) -> optax.Schedule:
  """Linear warm-up to ``learning_rate`` over ``warmup_steps`` updates (the first is not 0), then
  constant, or with ``decay='cosine'`` a half-cosine down to ``final_fraction * learning_rate``
  at ``total_steps``. Short runs gain from the decay: the last updates average out their noise."""
  warmup_steps = max(warmup_steps, 1)

  def warmup(count):
    return learning_rate * jnp.minimum(1.0, (count + 1) / warmup_steps)

  if decay == "constant":
    return warmup
  cosine = optax.cosine_decay_schedule(learning_rate, max(total_steps - warmup_steps, 1),
                                       alpha=final_fraction)
  return optax.join_schedules([warmup, cosine], [warmup_steps])


def learning_rate_schedule(learning_rate: float, optim: ml_collections.ConfigDict,
                           total_steps: int = 0) -> optax.Schedule:
  """The schedule :func:`make_optimizer` applies (also what the summaries record)."""
  return warmup_schedule(learning_rate, optim.warmup_steps, optim.lr_decay, total_steps,
                         optim.final_learning_rate_fraction)


def make_optimizer(learning_rate: float, optim: ml_collections.ConfigDict,
                   total_steps: int = 0) -> optax.GradientTransformation:
  """Adam(W) with linear warm-up, ``optim.lr_decay`` over ``total_steps``, optional clipping."""
  chain = []
  if optim.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  schedule = learning_rate_schedule(learning_rate, optim, total_steps)
  chain.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay))
  return optax.chain(*chain)
