"""Reconstruction metrics of the tokenizer: PSNR and SSIM per clip, in jnp so they jit, and the
sprite colour check of the embedded dataset (numpy).

Videos are ``[B, T, H, W, C]`` floats, by default in ``[-1, 1]`` (``data_range = 2``).
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np

from vqvdm_jax.data import synthetic

# Wang et al. 2004, §III-C: an 11x11 circular-symmetric Gaussian window, sigma 1.5, and the
# stabilising constants C1 = (K1 L)^2, C2 = (K2 L)^2.
SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
  """Peak signal-to-noise ratio per clip, 10 log10(L² / MSE): ``[B]`` in dB.

  The MSE is taken over the whole clip (every frame, pixel and channel) rather than averaging
  per-frame PSNRs: one near-perfect frame would otherwise dominate the mean through its very
  large PSNR. Identical clips give +inf.
  """
  error = x.astype(jnp.float32) - y.astype(jnp.float32)
  mse = jnp.mean(jnp.square(error), axis=tuple(range(1, x.ndim)))
  return 20.0 * jnp.log10(data_range) - 10.0 * jnp.log10(mse)


def _gaussian_window(size: int, sigma: float) -> jax.Array:
  """Normalised 1D Gaussian; the 2D window is its outer product (the filter is separable)."""
  offsets = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
  window = jnp.exp(-0.5 * jnp.square(offsets / sigma))
  return window / jnp.sum(window)


def _gaussian_filter_valid(images: jax.Array, window: jax.Array) -> jax.Array:
  """Separable Gaussian filtering of ``images [N, H, W, 1]`` with VALID borders."""
  size = window.shape[0]
  conv = lambda h, kernel: jax.lax.conv_general_dilated(  # noqa: E731
      h, kernel, window_strides=(1, 1), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)  # a metric: no TF32 / bf16 passes on accelerators.
  images = conv(images, window.reshape(size, 1, 1, 1))
  return conv(images, window.reshape(1, size, 1, 1))


def ssim(x: jax.Array, y: jax.Array, data_range: float = 2.0,
         minimum: float = -1.0) -> jax.Array:
  """Structural similarity per clip (Wang et al. 2004, eq. 13): ``[B]``.

  Computed per frame and channel with an 11x11 Gaussian window (sigma 1.5, VALID filtering),
  K1 = 0.01, K2 = 0.03, then averaged over positions, channels and frames. SSIM's luminance
  term is not shift-invariant, so values are first shifted to ``[0, data_range]`` by
  subtracting ``minimum``: a ``[-1, 1]`` video scores as its ``[0, 1]`` (or ``[0, 255]``) image
  would, the convention behind published SSIM numbers.
  """
  batch, _, height, width, _ = x.shape
  if min(height, width) < SSIM_WINDOW_SIZE:
    raise ValueError(f"ssim: frames of {height}x{width} are smaller than the "
                     f"{SSIM_WINDOW_SIZE}x{SSIM_WINDOW_SIZE} Gaussian window.")
  # Every (clip, frame, channel) is an independent grey image for the filter.
  to_images = lambda video: einops.rearrange(  # noqa: E731
      video.astype(jnp.float32) - minimum, "b t h w c -> (b t c) h w 1")
  x_images, y_images = to_images(x), to_images(y)
  window = _gaussian_window(SSIM_WINDOW_SIZE, SSIM_SIGMA)
  blur = lambda images: _gaussian_filter_valid(images, window)  # noqa: E731
  mu_x, mu_y = blur(x_images), blur(y_images)
  var_x = blur(x_images * x_images) - mu_x * mu_x
  var_y = blur(y_images * y_images) - mu_y * mu_y
  cov_xy = blur(x_images * y_images) - mu_x * mu_y
  c1 = (SSIM_K1 * data_range) ** 2
  c2 = (SSIM_K2 * data_range) ** 2
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
              / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)))
  per_image = jnp.mean(ssim_map, axis=(1, 2, 3))  # [(B T C)]
  return jnp.mean(per_image.reshape(batch, -1), axis=1)


# Issue 18's bar: a sprite's mean colour within 0.1 (on [0, 1], every channel) of the original's.
COLOUR_TOLERANCE = 0.1


def sprite_colour_error(original: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
  """Per clip, L∞ distance on [0, 1] between the mean sprite colours of two moving-sprite clips.

  ``original`` and ``reconstruction`` are uint8 ``[B, T, H, W, 3]``. The sprite's pixels are
  taken from the original alone: those whose three channels all exceed
  ``synthetic.SPRITE_THRESHOLD`` (every sprite channel is >= 0.55, every background pixel <= 0.5).
  Over those pixels (all frames) the mean colour of each clip is a 3-vector; the error is the
  largest of its three channel differences, ``max_c |mean_orig[c] - mean_rec[c]|``, ``[B]``
  float64. A clip with no sprite pixel gets NaN. A clip passes the colour check when its error
  is at most ``COLOUR_TOLERANCE``.
  """
  if original.shape != reconstruction.shape or original.ndim != 5 or original.shape[-1] != 3:
    raise ValueError(f"sprite_colour_error: expected two uint8 [B, T, H, W, 3] videos of one "
                     f"shape, got {original.shape} and {reconstruction.shape}.")
  original = np.asarray(original, np.float64) / 255.0
  reconstruction = np.asarray(reconstruction, np.float64) / 255.0
  mask = np.all(original > synthetic.SPRITE_THRESHOLD, axis=-1)[..., None]  # [B, T, H, W, 1]
  count = mask.sum(axis=(1, 2, 3))  # [B, 1]
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_original = (original * mask).sum(axis=(1, 2, 3)) / count  # [B, 3]
    mean_reconstruction = (reconstruction * mask).sum(axis=(1, 2, 3)) / count
  return np.abs(mean_original - mean_reconstruction).max(axis=-1)
