"""Reverse-process samplers (DDPM ancestral, DDIM) and classifier-free guidance (VQ-VDM eq. 9).

A sampler sees the network only through ``model_fn(z_t [B, T, H, W, C], t [B] int32) -> output``,
a closure the caller builds (params, FPS, labels and guidance already inside, e.g. with
:func:`make_guided_model_fn`). A sampler takes one key per row (``keys [B]``) and draws each
row's noise from its key alone (:mod:`vqvdm_jax.row_random`), so a row's sample does not depend
on the rest of its batch. Each sampler's loop is a ``jax.lax.fori_loop``, so under
``jax.jit`` the network is traced and compiled once however many steps are taken.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vqvdm_jax import row_random
from vqvdm_jax.diffusion.schedule import (
    DiffusionSchedule,
    log_alpha_cumprod_at,
    q_posterior_mean_variance,
    q_posterior_mean_variance_strided,
    x0_and_eps_from_output,
)

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
# apply_fn(params, z [B, T, H, W, C], timesteps [B], fps [B] | None, labels [B] | None) -> output
ApplyFn = Callable[..., jax.Array]


def guided_epsilon(eps_conditional: jax.Array, eps_unconditional: jax.Array,
                   guidance_scale: float | jax.Array) -> jax.Array:
  """VQ-VDM eq. 9 guidance: ε̂ = w · (ε_θ(z_t, t, f, c) − ε_θ(z_t, t, f)) + ε_θ(z_t, t, f).

  The weights w and 1 − w sum to one, so applying this to a v-prediction gives the v of the
  guided ε (v is affine in ε at fixed z_t, t): the same formula serves both parameterisations.
  """
  return guidance_scale * (eps_conditional - eps_unconditional) + eps_unconditional


def conditional_and_unconditional(apply_fn: ApplyFn, params, z: jax.Array, t: jax.Array,
                                  fps: jax.Array | None, labels: jax.Array,
                                  null_label: int) -> tuple[jax.Array, jax.Array]:
  """ε_θ(z_t, t, f, c) and ε_θ(z_t, t, f) from one forward pass on a batch of 2B.

  The conditional half carries ``labels``, the unconditional half the null label, so guidance
  costs one batched call rather than two sequential ones.
  """
  batch = z.shape[0]
  null_labels = jnp.full_like(labels, null_label)
  output = apply_fn(params,
                    jnp.concatenate([z, z], axis=0),
                    jnp.concatenate([t, t], axis=0),
                    None if fps is None else jnp.concatenate([fps, fps], axis=0),
                    jnp.concatenate([labels, null_labels], axis=0))
  return output[:batch], output[batch:]


def guidance_in_interval(guidance_scale: float | jax.Array, t: jax.Array,
                         interval: tuple[int, int] | None) -> float | jax.Array:
  """w where ``t [B]`` lies in ``[start, end)`` and 1 (the plain conditional) elsewhere.

  Kynkäänniemi et al. 2024: guidance at the highest noise levels mostly pushes samples toward a
  few layouts, and at the lowest changes little; applying it only in between keeps its effect on
  the class with less damage. ``interval=None`` guides at every step (VQ-VDM eq. 9 as written).
  """
  if interval is None:
    return guidance_scale
  start, end = interval
  return jnp.where((t >= start) & (t < end), guidance_scale, 1.0)


def make_guided_model_fn(apply_fn: ApplyFn, params, fps: jax.Array | None,
                         labels: jax.Array | None, null_label: int,
                         guidance_scale: float | jax.Array = 1.0,
                         guidance_interval: tuple[int, int] | None = None) -> ModelFn:
  """The sampler's ``model_fn(z_t, t)`` with params, FPS, labels and guidance (VQ-VDM eq. 9) bound.

  ``labels=None`` → the unconditional model. With labels, a Python ``guidance_scale`` of 1 is the
  conditional prediction alone and 0 the unconditional alone (one B-sized forward each); any
  other value, or a traced one, runs one 2B forward and mixes with :func:`guided_epsilon`,
  at the timesteps in ``guidance_interval`` only (:func:`guidance_in_interval`).
  """
  if labels is None:
    return lambda z, t: apply_fn(params, z, t, fps, None)
  if isinstance(guidance_scale, (int, float)) and guidance_scale == 1:
    return lambda z, t: apply_fn(params, z, t, fps, labels)
  if isinstance(guidance_scale, (int, float)) and guidance_scale == 0:
    return lambda z, t: apply_fn(params, z, t, fps, jnp.full_like(labels, null_label))

  def model_fn(z: jax.Array, t: jax.Array) -> jax.Array:
    conditional, unconditional = conditional_and_unconditional(
        apply_fn, params, z, t, fps, labels, null_label)
    scale = guidance_in_interval(guidance_scale, t, guidance_interval)
    if jnp.ndim(scale):  # one w per sample: broadcast over the latent's axes
      scale = jnp.reshape(scale, jnp.shape(scale) + (1,) * (conditional.ndim - 1))
    return guided_epsilon(conditional, unconditional, scale)

  return model_fn


def sampling_timesteps(num_train_steps: int, num_steps: int | None) -> np.ndarray:
  """The descending timesteps a sampler visits: all of them, or ``num_steps`` evenly spaced.

  The subset always starts at the last training step (pure noise) and ends at t = 0.
  """
  if num_steps is None or num_steps == num_train_steps:
    return np.arange(num_train_steps - 1, -1, -1, dtype=np.int32)
  if not 1 <= num_steps <= num_train_steps:
    raise ValueError(f"num_steps={num_steps} must be in [1, {num_train_steps}] "
                     "(the schedule's training steps).")
  steps = np.linspace(0, num_train_steps - 1, num_steps).round().astype(np.int32)
  return steps[::-1].copy()


def _previous_timesteps(timesteps: np.ndarray) -> np.ndarray:
  """The step each visited t jumps to; -1 after the last (ᾱ_{-1} = 1, the clean sample)."""
  return np.append(timesteps[1:], -1).astype(np.int32)


def _row_noise(keys: jax.Array, noise_shape: Sequence[int]
               ) -> tuple[jax.Array, Callable[[jax.Array, jnp.dtype], jax.Array]]:
  """``(z_T, noise(index, dtype))``: the initial noise ``noise_shape`` and step ``index``'s, row
  ``b`` from ``keys[b]`` alone (its initial key and ``fold_in(loop key, index)``)."""
  if keys.shape[0] != noise_shape[0]:
    raise ValueError(f"One key per sample: {keys.shape[0]} keys for noise_shape {noise_shape}.")
  init_keys, loop_keys = row_random.split(keys)
  row_shape = tuple(noise_shape[1:])

  def noise(index: jax.Array, dtype) -> jax.Array:
    return row_random.normal(row_random.fold_in(loop_keys, index), row_shape, dtype)

  return row_random.normal(init_keys, row_shape, jnp.float32), noise


def ddpm_sample(model_fn: ModelFn, schedule: DiffusionSchedule, noise_shape: Sequence[int],
                keys: jax.Array, prediction: str = "eps", clip_x0: float | None = None,
                num_steps: int | None = None) -> jax.Array:
  """Ho et al. 2020 Algorithm 2: ancestral sampling x_{t-1} ~ N(μ̃(x_t, x̂_0), β̃_t I).

  With ``num_steps`` below the schedule's length, steps are strided and the posterior between
  visited steps uses the respaced β' = 1 - ᾱ_t / ᾱ_s (Nichol & Dhariwal 2021 §4); no noise is
  added on the last step. ``keys [B]``: one per sample (``noise_shape[0]``), each row's noise
  drawn from its own. Returns z_0 ``noise_shape``.
  """
  timesteps = sampling_timesteps(schedule.num_steps, num_steps)
  previous = _previous_timesteps(timesteps)
  strided = len(timesteps) != schedule.num_steps
  timesteps, previous = jnp.asarray(timesteps), jnp.asarray(previous)
  z, noise = _row_noise(keys, noise_shape)
  batch = noise_shape[0]

  def step(index: jax.Array, z: jax.Array) -> jax.Array:
    t = jnp.full((batch,), timesteps[index], jnp.int32)
    x0, _ = x0_and_eps_from_output(schedule, z, t, model_fn(z, t), prediction, clip_x0)
    if strided:
      t_prev = jnp.full((batch,), previous[index], jnp.int32)
      mean, variance = q_posterior_mean_variance_strided(schedule, x0, z, t, t_prev)
    else:
      mean, variance, _ = q_posterior_mean_variance(schedule, x0, z, t)
    # β̃ is 0 at the last step already; the mask also makes that exact for strided chains.
    is_last = (previous[index] < 0).astype(z.dtype)
    return mean + (1.0 - is_last) * jnp.sqrt(variance) * noise(index, z.dtype)

  return jax.lax.fori_loop(0, len(timesteps), step, z)


def ddim_step(x0: jax.Array, eps: jax.Array, log_alpha_bar_prev: jax.Array, sigma: jax.Array,
              noise: jax.Array) -> jax.Array:
  """DDIM eq. 12: x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0 + sqrt(1 − ᾱ_{t-1} − σ_t²) ε̂ + σ_t ε."""
  one_minus_alpha_bar_prev = -jnp.expm1(log_alpha_bar_prev)
  direction = jnp.sqrt(jnp.maximum(one_minus_alpha_bar_prev - sigma**2, 0.0)) * eps
  return jnp.exp(0.5 * log_alpha_bar_prev) * x0 + direction + sigma * noise


def ddim_sigma(log_alpha_bar: jax.Array, log_alpha_bar_prev: jax.Array,
               eta: float) -> jax.Array:
  """DDIM eq. 16: σ_t = η sqrt((1 − ᾱ_{t-1}) / (1 − ᾱ_t)) sqrt(1 − ᾱ_t / ᾱ_{t-1}).

  Takes log ᾱ so each 1 − (·) is an expm1 and keeps its digits near t = 0.
  """
  return eta * jnp.sqrt(jnp.expm1(log_alpha_bar_prev) / jnp.expm1(log_alpha_bar)
                        * -jnp.expm1(log_alpha_bar - log_alpha_bar_prev))


def ddim_sample(model_fn: ModelFn, schedule: DiffusionSchedule, noise_shape: Sequence[int],
                keys: jax.Array, num_steps: int, eta: float = 0.0, prediction: str = "eps",
                clip_x0: float | None = None) -> jax.Array:
  """Song et al. 2021 (DDIM) sampling over ``num_steps`` evenly spaced timesteps.

  ``eta = 0`` is deterministic given the initial noise; ``eta = 1`` matches DDPM's posterior
  variance on the strided chain. ``keys [B]`` as for :func:`ddpm_sample`. Returns z_0
  ``noise_shape``.
  """
  timesteps = sampling_timesteps(schedule.num_steps, num_steps)
  previous = _previous_timesteps(timesteps)
  timesteps, previous = jnp.asarray(timesteps), jnp.asarray(previous)
  z, noise = _row_noise(keys, noise_shape)
  batch = noise_shape[0]

  def step(index: jax.Array, z: jax.Array) -> jax.Array:
    t = jnp.full((batch,), timesteps[index], jnp.int32)
    t_prev = jnp.full((batch,), previous[index], jnp.int32)
    x0, eps = x0_and_eps_from_output(schedule, z, t, model_fn(z, t), prediction, clip_x0)
    log_alpha_bar = log_alpha_cumprod_at(schedule, t, z.ndim)
    log_alpha_bar_prev = log_alpha_cumprod_at(schedule, t_prev, z.ndim)
    sigma = ddim_sigma(log_alpha_bar, log_alpha_bar_prev, eta)
    return ddim_step(x0, eps, log_alpha_bar_prev, sigma, noise(index, z.dtype))

  return jax.lax.fori_loop(0, len(timesteps), step, z)
