"""Noise schedules, the forward process and posterior, the samplers and classifier-free guidance."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvdm_jax.diffusion.samplers import (
    ddim_sample,
    ddpm_sample,
    guided_epsilon,
    make_guided_model_fn,
    sampling_timesteps,
)
from vqvdm_jax.diffusion.schedule import (
    cosine_beta_schedule,
    eps_from_v,
    linear_beta_schedule,
    loss_weight,
    make_schedule,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_posterior_mean_variance,
    q_posterior_mean_variance_strided,
    q_sample,
    signal_to_noise,
    training_target,
    v_target,
    x0_from_v,
)
from vqvdm_jax.row_random import video_keys

SHAPE = (2, 4, 8, 8, 4)  # [B, T, H, W, C] latents


def sample_keys(seed: int, batch: int = SHAPE[0], start: int = 0) -> jax.Array:
  """The keys of videos ``start .. start + batch - 1`` of a request with this seed: one a row."""
  return video_keys(seed, start, batch)


def normal(seed: int, shape=SHAPE) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alphas_cumprod_monotone_decreasing_in_open_unit_interval(kind):
  schedule = make_schedule(kind, 1000)
  alpha_bar = np.asarray(schedule.alphas_cumprod, np.float64)
  assert alpha_bar.shape == (1000,) and schedule.num_steps == 1000
  assert np.all(np.diff(alpha_bar) < 0)
  assert np.all((alpha_bar > 0) & (alpha_bar < 1))
  assert schedule.betas.dtype == jnp.float32
  assert float(schedule.betas.max()) <= 0.999 + 1e-6  # the cosine clip, in float32


def test_cosine_schedule_follows_its_closed_form():
  num_steps, s = 50, 0.008
  f = lambda t: np.cos((t / num_steps + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
  expected = f(np.arange(1, num_steps + 1)) / f(0)
  # the last beta is clipped to 0.999, so compare before it
  np.testing.assert_allclose(cosine_beta_schedule(num_steps).alphas_cumprod[:-1], expected[:-1],
                             rtol=1e-5)


def test_q_sample_matches_closed_form():
  schedule = linear_beta_schedule(1000)
  x0, noise, t = normal(0), normal(1), jnp.array([0, 637])
  alpha_bar = np.cumprod(1 - np.linspace(1e-4, 2e-2, 1000))[np.asarray(t)]
  alpha_bar = alpha_bar[:, None, None, None, None]
  expected = (np.sqrt(alpha_bar) * np.asarray(x0, np.float64)
              + np.sqrt(1 - alpha_bar) * np.asarray(noise, np.float64))
  np.testing.assert_allclose(q_sample(schedule, x0, t, noise), expected, rtol=1e-5, atol=1e-6)


def test_posterior_mean_and_variance_match_ho_eq7():
  betas = np.linspace(1e-4, 2e-2, 1000)
  schedule = linear_beta_schedule(1000)
  x0, xt = normal(0), normal(1)
  # Jitted: one compile instead of one for each op.
  posterior = jax.jit(lambda t: (q_posterior_mean_variance(schedule, x0, xt, t),
                                 q_posterior_mean_variance_strided(schedule, x0, xt, t, t - 1)))
  for step in (0, 1, 250, 999):
    t = np.array([step, step], np.int32)
    alpha_bar = np.cumprod(1 - betas)
    alpha_bar_prev = 1.0 if step == 0 else alpha_bar[step - 1]
    beta, ab = betas[step], alpha_bar[step]
    x0_64, xt_64 = np.asarray(x0, np.float64), np.asarray(xt, np.float64)
    mean_expected = (np.sqrt(alpha_bar_prev) * beta / (1 - ab) * x0_64
                     + np.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - ab) * xt_64)
    variance_expected = (1 - alpha_bar_prev) / (1 - ab) * beta
    (mean, variance, _), (strided_mean, strided_variance) = jax.tree.map(np.asarray, posterior(t))
    np.testing.assert_allclose(mean, mean_expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance[:, 0, 0, 0, 0], variance_expected, rtol=1e-5, atol=1e-12)
    # The respaced form between t and t - 1 is the same posterior.
    np.testing.assert_allclose(strided_mean, mean_expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(strided_variance[:, 0, 0, 0, 0], variance_expected, rtol=1e-4,
                               atol=1e-12)


def test_eps_and_x0_predictions_invert_each_other():
  schedule = linear_beta_schedule(1000)
  x0, noise, t = normal(0), normal(1), jnp.array([3, 900])
  xt = q_sample(schedule, x0, t, noise)
  np.testing.assert_allclose(predict_x0_from_eps(schedule, xt, t, noise), x0, atol=1e-3)
  np.testing.assert_allclose(predict_eps_from_x0(schedule, xt, t, x0), noise, atol=1e-3)


def test_v_prediction_target_round_trip():
  schedule = cosine_beta_schedule(1000)
  x0, noise, t = normal(0), normal(1), jnp.array([0, 511])
  xt = q_sample(schedule, x0, t, noise)
  v = v_target(schedule, x0, t, noise)
  np.testing.assert_allclose(x0_from_v(schedule, xt, t, v), x0, atol=1e-5)
  np.testing.assert_allclose(eps_from_v(schedule, xt, t, v), noise, atol=1e-5)
  np.testing.assert_array_equal(training_target(schedule, x0, t, noise, "v"), v)
  np.testing.assert_array_equal(training_target(schedule, x0, t, noise, "eps"), noise)
  with pytest.raises(ValueError, match="prediction"):
    training_target(schedule, x0, t, noise, "x0")


def perfect_model_fn(schedule, x0, prediction="eps"):
  """The true ε (or v) of x_t given the known x_0: eps = (x_t − sqrt(ᾱ)x_0) / sqrt(1 − ᾱ)."""

  def model_fn(z, t):
    alpha_bar = schedule.alphas_cumprod[t][:, None, None, None, None]
    eps = (z - jnp.sqrt(alpha_bar) * x0) / jnp.sqrt(1 - alpha_bar)
    return eps if prediction == "eps" else jnp.sqrt(alpha_bar) * eps - jnp.sqrt(1 - alpha_bar) * x0

  return model_fn


@pytest.mark.parametrize("sampler, prediction", [
    ("ddpm", "eps"), ("ddpm_strided", "eps"), ("ddim", "eps"), ("ddim_eta1", "eps"), ("ddim", "v")])
def test_samplers_with_a_perfect_predictor_recover_x0(sampler, prediction):
  schedule = make_schedule("linear", 200)
  x0 = 0.5 * normal(3)
  model_fn = perfect_model_fn(schedule, x0, prediction)
  run = {
      "ddpm": lambda keys: ddpm_sample(model_fn, schedule, SHAPE, keys, prediction),
      "ddpm_strided": lambda keys: ddpm_sample(model_fn, schedule, SHAPE, keys, prediction,
                                              num_steps=20),
      "ddim": lambda keys: ddim_sample(model_fn, schedule, SHAPE, keys, 20, 0.0, prediction),
      "ddim_eta1": lambda keys: ddim_sample(model_fn, schedule, SHAPE, keys, 20, 1.0, prediction),
  }[sampler]
  z0 = jax.jit(run)(sample_keys(0))
  np.testing.assert_allclose(z0, x0, atol=1e-4)


def test_sampling_is_deterministic_for_a_seed():
  schedule = make_schedule("cosine", 50)
  model_fn = lambda z, t: 0.1 * z  # noqa: E731
  sample = jax.jit(lambda keys: ddpm_sample(model_fn, schedule, SHAPE, keys))
  first, again = sample(sample_keys(7)), sample(sample_keys(7))
  np.testing.assert_array_equal(first, again)
  assert float(jnp.abs(first - sample(sample_keys(8))).max()) > 1e-3
  ddim = jax.jit(lambda keys: ddim_sample(model_fn, schedule, SHAPE, keys, 10, eta=0.5))
  np.testing.assert_array_equal(ddim(sample_keys(7)), ddim(sample_keys(7)))


def test_sampler_traces_the_model_once():
  schedule = make_schedule("linear", 100)
  traces = []

  def model_fn(z, t):
    traces.append(1)  # runs only while tracing
    return 0.1 * z

  jax.jit(lambda keys: ddpm_sample(model_fn, schedule, SHAPE, keys))(sample_keys(0))
  assert len(traces) == 1


def test_sampling_timesteps_descend_from_last_step_to_zero():
  full = sampling_timesteps(1000, None)
  assert full[0] == 999 and full[-1] == 0 and len(full) == 1000
  strided = sampling_timesteps(1000, 100)
  assert strided[0] == 999 and strided[-1] == 0 and len(strided) == 100
  assert np.all(np.diff(strided) < 0)
  with pytest.raises(ValueError, match="num_steps"):
    sampling_timesteps(10, 11)


def test_guided_epsilon_is_vqvdm_eq9():
  conditional, unconditional = normal(0), normal(1)
  for w in (0.0, 1.0, 3.5):
    np.testing.assert_allclose(guided_epsilon(conditional, unconditional, w),
                               w * (conditional - unconditional) + unconditional, rtol=1e-6)
  np.testing.assert_allclose(guided_epsilon(conditional, unconditional, 1.0), conditional,
                             atol=1e-6)


def fake_apply_fn(calls):
  """A stand-in network whose output depends on z, t, fps and labels; records batch sizes."""

  def apply_fn(params, z, t, fps, labels):
    calls.append(z.shape[0])
    out = params * z + 0.01 * t[:, None, None, None, None] + fps[:, None, None, None, None]
    return out + labels[:, None, None, None, None].astype(z.dtype)

  return apply_fn


def test_guidance_interval_guides_inside_and_is_conditional_outside():
  z, t = normal(0), jnp.array([100, 700])  # one sample inside [200, 800), one outside
  fps, labels, null_label = jnp.array([8.0, 16.0]), jnp.array([1, 2]), 5
  apply_fn = fake_apply_fn([])

  @jax.jit  # one compile instead of one for each op
  def outputs(z, t):
    return (apply_fn(2.0, z, t, fps, labels),
            apply_fn(2.0, z, t, fps, jnp.full_like(labels, null_label)),
            make_guided_model_fn(apply_fn, 2.0, fps, labels, null_label, 3.0, (200, 800))(z, t))

  conditional, unconditional, guided = jax.tree.map(np.asarray, outputs(z, t))
  np.testing.assert_allclose(guided[0], conditional[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(guided[1], (3.0 * (conditional - unconditional) + unconditional)[1],
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(guided[1], conditional[1])


def test_guidance_uses_one_batched_forward_and_w1_is_conditional():
  z, t = normal(0), jnp.array([10, 20])
  fps, labels, null_label = jnp.array([8.0, 16.0]), jnp.array([1, 2]), 5
  calls = []
  apply_fn = fake_apply_fn(calls)
  conditional = apply_fn(2.0, z, t, fps, labels)
  unconditional = apply_fn(2.0, z, t, fps, jnp.full_like(labels, null_label))
  calls.clear()

  guided = make_guided_model_fn(apply_fn, 2.0, fps, labels, null_label, 3.0)(z, t)
  assert calls == [4]  # one forward on the 2B batch
  np.testing.assert_allclose(guided, 3.0 * (conditional - unconditional) + unconditional,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      make_guided_model_fn(apply_fn, 2.0, fps, labels, null_label, 1.0)(z, t), conditional)
  np.testing.assert_allclose(
      make_guided_model_fn(apply_fn, 2.0, fps, labels, null_label, 0.0)(z, t), unconditional)
  # A traced (jnp) scale takes the batched path, and w = 1 still gives the conditional output.
  np.testing.assert_allclose(
      make_guided_model_fn(apply_fn, 2.0, fps, labels, null_label, jnp.float32(1.0))(z, t),
      conditional, rtol=1e-5, atol=1e-5)


def test_guided_model_fn_drives_a_sampler():
  schedule = make_schedule("linear", 20)
  calls = []
  model_fn = make_guided_model_fn(fake_apply_fn(calls), 0.1, jnp.array([8.0, 8.0]),
                                  jnp.array([0, 1]), 2, 2.0)
  z0 = jax.jit(lambda keys: ddim_sample(model_fn, schedule, SHAPE, keys, 5))(sample_keys(0))
  assert z0.shape == SHAPE and np.all(np.isfinite(np.asarray(z0)))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta1"])
def test_a_rows_sample_does_not_depend_on_the_other_rows_of_its_batch(sampler):
  # Every row draws its noise from its own key: appending rows (a larger batch, or the padding
  # of a last batch) leaves the first rows as they were, and a row's sample is that of its
  # video index whatever batch it is drawn in.
  schedule = make_schedule("linear", 100)
  model_fn = lambda z, t: 0.3 * jnp.tanh(z)  # noqa: E731 (row-wise, like the U-Net)

  @jax.jit
  def run(keys):
    shape = (keys.shape[0], *SHAPE[1:])
    if sampler == "ddpm":
      return ddpm_sample(model_fn, schedule, shape, keys, num_steps=10)
    return ddim_sample(model_fn, schedule, shape, keys, 10, eta=1.0)

  five = np.asarray(run(sample_keys(3, batch=5)))
  np.testing.assert_allclose(np.asarray(run(sample_keys(3, batch=2))), five[:2], rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(run(sample_keys(3, batch=3, start=2))), five[2:],
                             rtol=0, atol=1e-6)
  assert np.abs(five[0] - five[1]).max() > 0.1  # the rows do differ


def test_samplers_need_one_key_per_sample():
  with pytest.raises(ValueError, match="One key per sample: 1 keys"):
    ddpm_sample(lambda z, t: z, make_schedule("linear", 10), SHAPE, sample_keys(0, batch=1))


def test_ddim_with_eta_one_is_strided_ddpm():
  # DDIM eq. 16 with η = 1 makes σ_t² the respaced DDPM posterior variance, and the two samplers
  # draw the same noise for a seed, so the chains coincide.
  schedule = make_schedule("linear", 100)
  model_fn = lambda z, t: 0.3 * jnp.tanh(z)  # noqa: E731
  keys = sample_keys(4)
  ddpm = jax.jit(lambda: ddpm_sample(model_fn, schedule, SHAPE, keys, num_steps=10))()
  ddim = jax.jit(lambda: ddim_sample(model_fn, schedule, SHAPE, keys, 10, eta=1.0))()
  np.testing.assert_allclose(ddim, ddpm, rtol=1e-4, atol=1e-4)


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match="linear"):
    make_schedule("quadratic", 10)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weight_makes_the_loss_min_snr_times_the_x0_error(prediction):
  schedule = linear_beta_schedule(1000)
  gamma = 5.0
  t = jnp.array([0, 30, 200, 500, 999])  # SNR from ~1e4 down to ~4e-5: both sides of gamma
  shape = (5, 2, 4, 4, 3)
  x0, noise, error = normal(0, shape), normal(1, shape), 0.1 * normal(2, shape)

  @jax.jit  # one compile instead of one for each op
  def weighted_and_snr(x0, noise, error):
    xt = q_sample(schedule, x0, t, noise)
    x0_hat = x0 + error
    eps_hat = predict_eps_from_x0(schedule, xt, t, x0_hat)
    output = eps_hat if prediction == "eps" else v_target(schedule, x0_hat, t, eps_hat)
    target = training_target(schedule, x0, t, noise, prediction)
    per_sample = jnp.mean((output - target) ** 2, axis=(1, 2, 3, 4))
    return (loss_weight(schedule, t, prediction, "min_snr", gamma) * per_sample,
            signal_to_noise(schedule, t))

  weighted, snr = weighted_and_snr(x0, noise, error)
  snr = np.asarray(snr, np.float64)
  expected = np.minimum(snr, gamma) * np.mean(np.asarray(error, np.float64) ** 2, axis=(1, 2, 3, 4))
  np.testing.assert_allclose(weighted, expected, rtol=2e-3)
  assert snr[0] > gamma > snr[-1]


def test_uniform_weight_is_one_and_unknown_weighting_is_rejected():
  schedule = linear_beta_schedule(1000)
  t = jnp.array([0, 500, 999])
  np.testing.assert_array_equal(loss_weight(schedule, t, "v", "uniform"), np.ones(3))
  with pytest.raises(ValueError, match="min_snr"):
    loss_weight(schedule, t, "v", "p2")


def recording_model_fn(model_fn, states):
  """``model_fn`` that also records each (t, z_t) a sampler hands it, from inside the jitted loop."""

  def record(z, t):
    states.append((int(t[0]), np.asarray(z, np.float64)))

  def recorded(z, t):
    jax.debug.callback(record, z, t)
    return model_fn(z, t)

  return recorded


def linear_alpha_bar_64(num_steps: int) -> np.ndarray:
  """ᾱ_t of Ho et al.'s linear schedule (1e-4 .. 2e-2) in float64, with ᾱ_{-1} = 1 appended."""
  return np.append(np.cumprod(1.0 - np.linspace(1e-4, 2e-2, num_steps)), 1.0)  # [-1] is ᾱ_{-1}


def visited_states(run, states):
  """Runs the jitted sampler; returns its output and the states it visited, t descending."""
  z0 = np.asarray(jax.jit(run)(sample_keys(0)), np.float64)
  jax.effects_barrier()
  return z0, sorted(states, key=lambda state: -state[0])


@pytest.mark.parametrize("num_steps", [20, 200])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_states_follow_the_closed_form_marginal(prediction, num_steps):
  # With the true ε of a known x_0, DDIM (η = 0) keeps ε fixed: every visited state is
  # x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε, ε read off the initial noise, and the last step gives x_0.
  schedule = make_schedule("linear", 200)
  alpha_bar = linear_alpha_bar_64(200)
  x0 = 0.5 * normal(3)
  states = []
  model_fn = recording_model_fn(perfect_model_fn(schedule, x0, prediction), states)
  z0, states = visited_states(
      lambda keys: ddim_sample(model_fn, schedule, SHAPE, keys, num_steps, 0.0, prediction), states)
  expected_timesteps = np.linspace(0, 199, num_steps).round().astype(int)[::-1]
  assert [t for t, _ in states] == list(expected_timesteps)
  x0_64 = np.asarray(x0, np.float64)
  t_first, z_first = states[0]
  assert t_first == 199 and abs(z_first.std() - 1.0) < 0.1  # starts from unit Gaussian noise
  eps = (z_first - np.sqrt(alpha_bar[t_first]) * x0_64) / np.sqrt(1.0 - alpha_bar[t_first])
  for t, z in states[1:]:
    expected = np.sqrt(alpha_bar[t]) * x0_64 + np.sqrt(1.0 - alpha_bar[t]) * eps
    np.testing.assert_allclose(z, expected, atol=2e-5, err_msg=f"t = {t}")
  np.testing.assert_allclose(z0, x0_64, atol=2e-5)


@pytest.mark.parametrize("num_steps", [None, 20])
def test_ddpm_steps_are_the_posterior_mean_plus_state_independent_noise(num_steps):
  # x_s = μ̃(x_0, x_t) + sqrt(β̃) n with μ̃ = sqrt(ᾱ_s) β'/(1 − ᾱ_t) x_0 + sqrt(ᾱ_t/ᾱ_s)(1 − ᾱ_s)/(1 − ᾱ_t)
  # x_t, β' = 1 − ᾱ_t/ᾱ_s, β̃ = (1 − ᾱ_s)/(1 − ᾱ_t) β' (s = t − 1 on the full chain: Ho eq. 7).
  # Two chains with the same seed but different x_0 draw the same n, so the residuals
  # x_s − μ̃ (float64 μ̃ from the recorded states) must coincide, and be N(0, β̃) noise.
  schedule = make_schedule("linear", 200)
  alpha_bar = linear_alpha_bar_64(200)
  chains = []
  for seed in (3, 4):
    x0 = 0.5 * normal(seed)
    states = []
    model_fn = recording_model_fn(perfect_model_fn(schedule, x0), states)
    z0, states = visited_states(
        lambda keys, model_fn=model_fn: ddpm_sample(model_fn, schedule, SHAPE, keys,
                                                   num_steps=num_steps), states)
    chains.append((np.asarray(x0, np.float64), states + [(-1, z0)]))
  expected_timesteps = (np.arange(199, -1, -1) if num_steps is None
                        else np.linspace(0, 199, num_steps).round().astype(int)[::-1])
  for _, states in chains:
    assert [t for t, _ in states] == list(expected_timesteps) + [-1]

  def residuals(x0, states):
    out = []
    for (t, xt), (s, xs) in itertools.pairwise(states):
      ab_t, ab_s = alpha_bar[t], alpha_bar[s]
      beta = 1.0 - ab_t / ab_s
      mean = (np.sqrt(ab_s) * beta / (1.0 - ab_t) * x0
              + np.sqrt(ab_t / ab_s) * (1.0 - ab_s) / (1.0 - ab_t) * xt)
      out.append((t, xs - mean, (1.0 - ab_s) / (1.0 - ab_t) * beta))
    return out

  first, second = (residuals(x0, states) for x0, states in chains)
  for (t, r1, variance), (_, r2, _) in zip(first, second):
    np.testing.assert_allclose(r1, r2, atol=2e-5, err_msg=f"t = {t}")
    if variance == 0:  # the last step adds no noise: it returns the mean, here x_0 itself
      np.testing.assert_allclose(r1, 0.0, atol=2e-5)
      continue
    standardised = r1 / np.sqrt(variance)
    assert abs(standardised.mean()) < 0.1 and abs(standardised.std() - 1.0) < 0.1, (
        t, standardised.mean(), standardised.std())
  assert first[-1][0] == 0 and first[-1][2] == 0.0
