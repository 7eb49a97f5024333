"""PSNR and SSIM per clip against closed forms and a direct numpy SSIM."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvdm_jax.evaluation.reconstruction import psnr, ssim


def _video(key, shape=(2, 2, 16, 16, 3)):
  return jax.random.uniform(jax.random.key(key), shape, minval=-1.0, maxval=1.0)


def test_psnr_of_identical_clips_is_infinite():
  x = _video(0)
  assert np.all(np.isposinf(np.asarray(psnr(x, x))))


def test_psnr_of_a_constant_offset_is_known_value():
  x = _video(1) * 0.5
  offsets = jnp.array([0.2, 0.1])[:, None, None, None, None]
  np.testing.assert_allclose(psnr(x, x + offsets), [20.0, 20 * math.log10(2 / 0.1)], rtol=1e-4)


def test_psnr_uses_the_mse_over_the_whole_clip():
  x = _video(2) * 0.5
  y = x.at[:, 1].add(0.2)  # frame 0 exact, frame 1 off by 0.2: clip MSE = 0.04 / 2.
  np.testing.assert_allclose(psnr(x, y), 10 * math.log10(4 / 0.02), rtol=1e-4)


def test_ssim_of_identical_clips_is_one():
  x = _video(3)
  np.testing.assert_allclose(ssim(x, x), 1.0, rtol=1e-5)


def test_ssim_decreases_with_noise():
  x = _video(4) * 0.5
  noise = jax.random.normal(jax.random.key(5), x.shape)
  slight, heavy = ssim(x, x + 0.05 * noise), ssim(x, x + 0.5 * noise)
  assert np.all(np.asarray(slight) < 1.0)
  assert np.all(np.asarray(heavy) < np.asarray(slight))


def _numpy_ssim(x, y, data_range, size=11, sigma=1.5, k1=0.01, k2=0.03):
  """Wang et al. 2004 written directly: a weighted window at each VALID position, float64."""
  offsets = np.arange(size) - (size - 1) / 2
  g = np.exp(-(offsets**2) / (2 * sigma**2))
  w = np.outer(g, g) / np.sum(np.outer(g, g))
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  values = []
  for i in range(x.shape[0] - size + 1):
    for j in range(x.shape[1] - size + 1):
      a, b = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
      mu_a, mu_b = np.sum(w * a), np.sum(w * b)
      var_a, var_b = np.sum(w * (a - mu_a) ** 2), np.sum(w * (b - mu_b) ** 2)
      cov = np.sum(w * (a - mu_a) * (b - mu_b))
      values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                    / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
  return np.mean(values)


def test_ssim_matches_a_direct_numpy_reference_on_one_frame():
  x = np.asarray(_video(6, (1, 1, 16, 14, 3)), np.float64)
  y = np.clip(x + 0.3 * np.asarray(jax.random.normal(jax.random.key(7), x.shape)), -1, 1)
  # [-1, 1] frames are scored as their [0, 1] images with data range 1 (the usual convention).
  expected = np.mean([_numpy_ssim((x[0, 0, ..., c] + 1) / 2, (y[0, 0, ..., c] + 1) / 2, 1.0)
                      for c in range(3)])
  got = ssim(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  assert got.shape == (1,)
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_ssim_of_a_signed_range_equals_ssim_of_the_shifted_range():
  x, y = _video(8) * 0.8, _video(9) * 0.8
  np.testing.assert_allclose(ssim(x, y), ssim((x + 1) / 2, (y + 1) / 2, 1.0, 0.0), rtol=1e-5)
  # Without the shift the luminance term changes: the shift matters, it is not a no-op.
  assert not np.allclose(ssim(x, y), ssim(x, y, 2.0, 0.0), rtol=1e-3)


def test_ssim_rejects_frames_smaller_than_the_window():
  with pytest.raises(ValueError, match="11x11"):
    ssim(jnp.zeros((1, 1, 8, 8, 3)), jnp.zeros((1, 1, 8, 8, 3)))


def test_metrics_jit_and_return_one_value_per_clip():
  x, y = _video(10), _video(11)
  assert jax.jit(psnr)(x, y).shape == (2,)
  np.testing.assert_allclose(jax.jit(ssim)(x, y), ssim(x, y), rtol=1e-6)


def _sprite_clips(num_clips=4):
  """Moving-sprite clips [B, 8, 16, 16, 3] uint8 from the embedded dataset."""
  from vqvdm_jax.data.synthetic import MovingSprites
  source = MovingSprites(num_clips=num_clips, num_frames=8, resolution=16, num_classes=4,
                         fps_values=(8.0,), seed=0, split="eval", sprite_size=0.4)
  return np.stack([source[i]["video"] for i in range(num_clips)])


def test_colour_check_passes_a_faithful_reconstruction_and_fails_a_whitened_one():
  from vqvdm_jax.evaluation.reconstruction import COLOUR_TOLERANCE, sprite_colour_error
  clips = _sprite_clips()
  # Faithful but imperfect: small noise and a slightly blurred edge still keep the colour.
  noise = np.random.default_rng(0).normal(0.0, 6.0, clips.shape)
  faithful = np.clip(clips + noise, 0, 255).round().astype(np.uint8)
  assert np.all(sprite_colour_error(clips, clips) == 0.0)
  assert np.all(sprite_colour_error(clips, faithful) <= COLOUR_TOLERANCE)
  # The failure: every sprite comes back the same light grey.
  whitened = clips.copy()
  sprite = np.all(clips / 255.0 > 0.525, axis=-1)
  whitened[sprite] = 220
  errors = sprite_colour_error(clips, whitened)
  assert np.all(errors > COLOUR_TOLERANCE), errors


def test_colour_check_is_the_largest_channel_error_of_the_mean_sprite_colour():
  from vqvdm_jax.evaluation.reconstruction import sprite_colour_error
  clip = np.full((1, 2, 16, 16, 3), 40, np.uint8)  # dark background
  clip[:, :, 4:8, 4:8] = (200, 150, 180)  # a sprite (every channel > 0.525)
  shifted = clip.copy()
  shifted[:, :, 4:8, 4:8] = (200 + 51, 150 - 20, 180)  # red +0.2, green -0.078
  shifted[:, :, 0:2, 0:2] = 90  # background changes do not count
  np.testing.assert_allclose(sprite_colour_error(clip, shifted), [51 / 255.0])
