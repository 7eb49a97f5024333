"""The DDPM forward process: noise schedules, q(z_t | z_0), the posterior and the prediction maps.

Every coefficient is computed in float64 numpy and stored as float32, so 1 - ᾱ_t near t = 0
(≈ 1e-4) keeps its digits. Per-sample coefficients are gathered at ``t [B]`` (integers in
``[0, num_steps)``; t = 0 is the first noising step) and broadcast against the channel-last
latent ``[B, T, H, W, C]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PREDICTIONS = ("eps", "v")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


@struct.dataclass
class DiffusionSchedule:
  """β_t and everything derived from it (Ho et al. 2020 §2), each ``[num_steps]`` float32."""

  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array  # ᾱ_t
  log_alphas_cumprod: jax.Array  # log ᾱ_t: ratios and 1 - ᾱ of strided steps stay exact via expm1
  alphas_cumprod_prev: jax.Array  # ᾱ_{t-1}, with ᾱ_{-1} = 1
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array  # 1 / sqrt(ᾱ_t)
  sqrt_recipm1_alphas_cumprod: jax.Array  # sqrt(1 / ᾱ_t - 1)
  posterior_variance: jax.Array  # β̃_t (Ho eq. 7)
  posterior_log_variance_clipped: jax.Array  # log β̃_t, with β̃_0 := β̃_1 (β̃_0 = 0)
  posterior_mean_coef1: jax.Array  # multiplies x_0 in μ̃_t (Ho eq. 7)
  posterior_mean_coef2: jax.Array  # multiplies x_t in μ̃_t

  @property
  def num_steps(self) -> int:
    return self.betas.shape[0]


def schedule_from_betas(betas: np.ndarray) -> DiffusionSchedule:
  """All the forward and posterior coefficients of Ho et al. 2020 from β_1..β_T (float64 math)."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
    raise ValueError("betas must be a 1-D array with every value in (0, 1).")
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  # β̃_0 = 0 has no logarithm; like Ho et al.'s code, use β̃_1 in its place (a floor if T = 1).
  clipped_variance = posterior_variance.copy()
  clipped_variance[0] = posterior_variance[1] if len(betas) > 1 else 1e-20
  log_variance = np.log(clipped_variance)
  values = dict(
      betas=betas,
      alphas=alphas,
      alphas_cumprod=alphas_cumprod,
      log_alphas_cumprod=np.log(alphas_cumprod),
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=log_variance,
      posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
  )
  return DiffusionSchedule(**{name: jnp.asarray(value, jnp.float32)
                              for name, value in values.items()})


def linear_beta_schedule(num_steps: int, beta_start: float = 1e-4,
                         beta_end: float = 2e-2) -> DiffusionSchedule:
  """Ho et al. 2020 §4: β linear from 1e-4 to 0.02 (over 1000 steps in the paper)."""
  return schedule_from_betas(np.linspace(beta_start, beta_end, num_steps, dtype=np.float64))


def cosine_beta_schedule(num_steps: int, s: float = 0.008,
                         max_beta: float = 0.999) -> DiffusionSchedule:
  """Nichol & Dhariwal 2021 eq. 17: ᾱ_t = f(t) / f(0), f(t) = cos²((t/T + s) / (1 + s) · π/2).

  β_t = 1 - ᾱ_t / ᾱ_{t-1}, clipped at 0.999 so the last steps stay finite.
  """
  steps = np.arange(num_steps + 1, dtype=np.float64) / num_steps
  f = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
  betas = 1.0 - f[1:] / f[:-1]
  return schedule_from_betas(np.clip(betas, 0.0, max_beta))


def make_schedule(kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2,
                  cosine_s: float = 0.008) -> DiffusionSchedule:
  """The schedule named by ``kind`` ('linear' or 'cosine'): the config's entry point."""
  if kind == "linear":
    return linear_beta_schedule(num_steps, beta_start, beta_end)
  if kind == "cosine":
    return cosine_beta_schedule(num_steps, cosine_s)
  raise ValueError(f"Unknown noise schedule {kind!r}; choose 'linear' or 'cosine'.")


def extract(coefficients: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """``coefficients[t]`` for ``t [B]``, shaped ``[B, 1, ..., 1]`` to broadcast over a latent."""
  values = jnp.take(coefficients, jnp.asarray(t, jnp.int32), axis=0)
  return values.reshape(values.shape + (1,) * (ndim - 1))


def q_sample(schedule: DiffusionSchedule, x0: jax.Array, t: jax.Array,
             noise: jax.Array) -> jax.Array:
  """Ho et al. 2020 eq. 4: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior_mean_variance(schedule: DiffusionSchedule, x0: jax.Array, xt: jax.Array,
                              t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Ho et al. 2020 eqs. 6–7: q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I).

  μ̃_t = sqrt(ᾱ_{t-1}) β_t / (1 - ᾱ_t) x_0 + sqrt(α_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t) x_t,
  β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t. Returns (mean, variance, clipped log variance).
  """
  mean = (extract(schedule.posterior_mean_coef1, t, xt.ndim) * x0
          + extract(schedule.posterior_mean_coef2, t, xt.ndim) * xt)
  variance = extract(schedule.posterior_variance, t, xt.ndim)
  log_variance = extract(schedule.posterior_log_variance_clipped, t, xt.ndim)
  return mean, variance, log_variance


def log_alpha_cumprod_at(schedule: DiffusionSchedule, t: jax.Array, ndim: int) -> jax.Array:
  """log ᾱ_t, with t = -1 meaning 'no noise' (ᾱ_{-1} = 1): the end point of a strided sampler.

  Strided samplers work with log ᾱ because 1 - ᾱ_t / ᾱ_s = -expm1(log ᾱ_t - log ᾱ_s) keeps
  full float32 precision near t = 0, where the ratio of two stored ᾱ would lose ~3 digits.
  """
  t = jnp.asarray(t, jnp.int32)
  value = extract(schedule.log_alphas_cumprod, jnp.maximum(t, 0), ndim)
  return jnp.where(t.reshape(value.shape) < 0, 0.0, value)


def q_posterior_mean_variance_strided(schedule: DiffusionSchedule, x0: jax.Array, xt: jax.Array,
                                      t: jax.Array, t_prev: jax.Array
                                      ) -> tuple[jax.Array, jax.Array]:
  """Ho et al. 2020 eq. 7 between any t > s (Nichol & Dhariwal 2021 §4 respacing).

  The strided chain has β'_t = 1 - ᾱ_t / ᾱ_s, so μ̃ = sqrt(ᾱ_s) β' / (1 - ᾱ_t) x_0 +
  sqrt(ᾱ_t / ᾱ_s) (1 - ᾱ_s) / (1 - ᾱ_t) x_t and β̃ = (1 - ᾱ_s) / (1 - ᾱ_t) β'; s = t - 1 gives
  eq. 7 exactly. ``t_prev = -1`` is the final step (ᾱ_s = 1). Returns (mean, variance).
  """
  log_alpha_bar = log_alpha_cumprod_at(schedule, t, xt.ndim)
  log_alpha_bar_prev = log_alpha_cumprod_at(schedule, t_prev, xt.ndim)
  log_ratio = log_alpha_bar - log_alpha_bar_prev  # log(ᾱ_t / ᾱ_s)
  beta = -jnp.expm1(log_ratio)
  one_minus_alpha_bar = -jnp.expm1(log_alpha_bar)
  one_minus_alpha_bar_prev = -jnp.expm1(log_alpha_bar_prev)
  mean = (jnp.exp(0.5 * log_alpha_bar_prev) * beta / one_minus_alpha_bar * x0
          + jnp.exp(0.5 * log_ratio) * one_minus_alpha_bar_prev / one_minus_alpha_bar * xt)
  variance = one_minus_alpha_bar_prev / one_minus_alpha_bar * beta
  return mean, variance


def predict_x0_from_eps(schedule: DiffusionSchedule, xt: jax.Array, t: jax.Array,
                        eps: jax.Array) -> jax.Array:
  """Ho et al. 2020 eq. 4 solved for x_0: x_0 = x_t / sqrt(ᾱ_t) - sqrt(1/ᾱ_t - 1) ε."""
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt
          - extract(schedule.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps)


def predict_eps_from_x0(schedule: DiffusionSchedule, xt: jax.Array, t: jax.Array,
                        x0: jax.Array) -> jax.Array:
  """Ho et al. 2020 eq. 4 solved for ε: ε = (x_t / sqrt(ᾱ_t) - x_0) / sqrt(1/ᾱ_t - 1)."""
  return ((extract(schedule.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt - x0)
          / extract(schedule.sqrt_recipm1_alphas_cumprod, t, xt.ndim))


def v_target(schedule: DiffusionSchedule, x0: jax.Array, t: jax.Array,
             noise: jax.Array) -> jax.Array:
  """Salimans & Ho 2022 §4: v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * noise
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def x0_from_v(schedule: DiffusionSchedule, xt: jax.Array, t: jax.Array,
              v: jax.Array) -> jax.Array:
  """Salimans & Ho 2022 §4: x_0 = sqrt(ᾱ_t) x_t - sqrt(1 - ᾱ_t) v."""
  return (extract(schedule.sqrt_alphas_cumprod, t, xt.ndim) * xt
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * v)


def eps_from_v(schedule: DiffusionSchedule, xt: jax.Array, t: jax.Array,
               v: jax.Array) -> jax.Array:
  """Salimans & Ho 2022 §4: ε = sqrt(1 - ᾱ_t) x_t + sqrt(ᾱ_t) v."""
  return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * xt
          + extract(schedule.sqrt_alphas_cumprod, t, xt.ndim) * v)


def training_target(schedule: DiffusionSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array,
                    prediction: str = "eps") -> jax.Array:
  """What the network regresses: ε (Ho et al. 2020 eq. 14, VQ-VDM's L_class) or v."""
  if prediction == "eps":
    return noise
  if prediction == "v":
    return v_target(schedule, x0, t, noise)
  raise ValueError(f"Unknown prediction {prediction!r}; choose one of {PREDICTIONS}.")


def signal_to_noise(schedule: DiffusionSchedule, t: jax.Array) -> jax.Array:
  """SNR(t) = ᾱ_t / (1 - ᾱ_t) for ``t [B]``, shape ``[B]``."""
  alpha_bar = jnp.take(schedule.alphas_cumprod, jnp.asarray(t, jnp.int32), axis=0)
  return alpha_bar / (1.0 - alpha_bar)


def loss_weight(schedule: DiffusionSchedule, t: jax.Array, prediction: str = "eps",
                weighting: str = "uniform", min_snr_gamma: float = 5.0) -> jax.Array:
  """Per-sample weight ``[B]`` of the regression loss; 'uniform' is 1 (Ho et al.'s L_simple).

  'min_snr' is Hang et al. 2023 (Min-SNR-γ): weight the x_0 error by min(SNR, γ). An ε error is
  SNR times an x_0 error and a v error (SNR + 1) times, so the weight on the ε loss is
  min(SNR, γ) / SNR and on the v loss min(SNR, γ) / (SNR + 1). It stops the low-noise steps, whose
  loss is large and which only refine detail, from dominating the gradient.
  """
  if weighting == "uniform":
    return jnp.ones(jnp.shape(t), jnp.float32)
  if weighting != "min_snr":
    raise ValueError(f"Unknown loss weighting {weighting!r}; choose one of {LOSS_WEIGHTINGS}.")
  snr = signal_to_noise(schedule, t)
  clipped = jnp.minimum(snr, min_snr_gamma)
  if prediction == "eps":
    return clipped / snr
  if prediction == "v":
    return clipped / (snr + 1.0)
  raise ValueError(f"Unknown prediction {prediction!r}; choose one of {PREDICTIONS}.")


def x0_and_eps_from_output(schedule: DiffusionSchedule, xt: jax.Array, t: jax.Array,
                           model_output: jax.Array, prediction: str = "eps",
                           clip_x0: float | None = None) -> tuple[jax.Array, jax.Array]:
  """The network's output read as (x̂_0, ε̂); with ``clip_x0`` x̂_0 is clipped and ε̂ re-derived."""
  if prediction == "eps":
    eps = model_output
    x0 = predict_x0_from_eps(schedule, xt, t, eps)
  elif prediction == "v":
    x0 = x0_from_v(schedule, xt, t, model_output)
    eps = eps_from_v(schedule, xt, t, model_output)
  else:
    raise ValueError(f"Unknown prediction {prediction!r}; choose one of {PREDICTIONS}.")
  if clip_x0 is not None:
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
    eps = predict_eps_from_x0(schedule, xt, t, x0)
  return x0, eps
