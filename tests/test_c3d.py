"""C3D: the channel-first (Caffe/Chainer) conversion gives the same network, and loading checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import bilinear_resize
from PIL import Image

from vqvdm_jax.evaluation import c3d

WIDTHS = (2, 3, 3, 4, 4, 4, 5, 5)
POOLS = {"conv1a": ((1, 2, 2), (0, 0)), "conv2a": ((2, 2, 2), (0, 0)),
         "conv3b": ((2, 2, 2), (0, 0)), "conv4b": ((2, 2, 2), (0, 0)),
         "conv5b": ((2, 2, 2), (0, 1))}  # Caffe's ceil-mode pool5: 7 -> 4 (pads right/bottom)


def _random_channel_first_weights(rng, num_classes=7, fc_width=6):
  arrays, in_channels = {}, 3
  for layer, width in zip(c3d.CONV_LAYERS, WIDTHS):
    arrays[f"{layer}/W"] = rng.normal(0, 0.3, (width, in_channels, 3, 3, 3)).astype(np.float32)
    arrays[f"{layer}/b"] = rng.normal(0, 0.1, width).astype(np.float32)
    in_channels = width
  for layer, (fan_in, fan_out) in zip(c3d.FC_LAYERS, ((WIDTHS[-1] * 16, fc_width),
                                                      (fc_width, fc_width),
                                                      (fc_width, num_classes))):
    arrays[f"{layer}/W"] = rng.normal(0, 0.3, (fan_out, fan_in)).astype(np.float32)
    arrays[f"{layer}/b"] = rng.normal(0, 0.1, fan_out).astype(np.float32)
  arrays["mean"] = rng.uniform(0, 255, (3, 16, 128, 171)).astype(np.float32)
  return arrays


def _channel_first_forward(arrays, clip_bgr):
  """The source network as Caffe runs it: NCTHW, BGR input, (C, T, H, W) flattening."""
  x = clip_bgr
  for layer in c3d.CONV_LAYERS:
    x = jax.lax.conv_general_dilated(x, arrays[f"{layer}/W"], (1, 1, 1), [(1, 1)] * 3,
                                     dimension_numbers=("NCDHW", "OIDHW", "NCDHW"),
                                     precision=jax.lax.Precision.HIGHEST)
    x = jax.nn.relu(x + arrays[f"{layer}/b"][None, :, None, None, None])
    if layer in POOLS:
      window, pad = POOLS[layer]
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, *window), (1, 1, *window),
                                ((0, 0), (0, 0), (0, 0), pad, pad))
  x = x.reshape(x.shape[0], -1)
  for layer in c3d.FC_LAYERS:
    x = x @ arrays[f"{layer}/W"].T + arrays[f"{layer}/b"]
    x = jax.nn.relu(x) if layer != "fc8" else x
  return x


def test_converted_channel_first_weights_give_the_same_logits(tmp_path):
  rng = np.random.default_rng(0)
  source = _random_channel_first_weights(rng)
  np.savez(tmp_path / "c3d.npz", **c3d.from_channel_first(source, bgr_input=True))
  module, variables = c3d.load(tmp_path / "c3d.npz")
  assert module.widths == WIDTHS and module.num_classes == 7
  clip_rgb = rng.uniform(-100, 100, (2, 16, 112, 112, 3)).astype(np.float32)
  # Jitted: one compile instead of one per op.
  ours = jax.jit(module.apply)({"params": variables["params"]}, clip_rgb)
  clip_bgr_first = np.transpose(clip_rgb[..., ::-1], (0, 4, 1, 2, 3))
  reference = jax.jit(_channel_first_forward)(source, clip_bgr_first)
  np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
  # The mean clip becomes channel-last RGB.
  np.testing.assert_array_equal(variables["mean"][3, 5, 7],
                                source["mean"][::-1, 3, 5, 7])


def test_loading_names_the_missing_keys(tmp_path):
  np.savez(tmp_path / "partial.npz", mean=np.zeros(3))
  with pytest.raises(ValueError, match="conv1a/kernel"):
    c3d.load(tmp_path / "partial.npz")
  with pytest.raises(FileNotFoundError, match="c3d_weights"):
    c3d.load(tmp_path / "missing.npz")


def test_preprocess_resizes_the_first_16_frames_subtracts_the_mean_clip_and_centre_crops():
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (2, 18, 30, 40, 3), dtype=np.uint8)
  mean = rng.uniform(0, 255, (16, 128, 171, 3)).astype(np.float32)
  got = np.asarray(jax.jit(c3d.preprocess)(jnp.asarray(video), jnp.asarray(mean)))
  assert got.shape == (2, 16, 112, 112, 3)
  # PIL's bilinear resize (float images; upscaling, so no antialiasing to differ) per channel.
  resized = np.stack([np.stack([np.stack([
      np.asarray(Image.fromarray(video[b, t, :, :, c].astype(np.float32), mode="F")
                 .resize((171, 128), Image.BILINEAR), np.float64)
      for c in range(3)], axis=-1) for t in range(16)]) for b in range(2)])
  expected = (resized - mean)[:, :, 8:120, 29:141]  # (128 - 112) / 2 and (171 - 112) // 2
  np.testing.assert_allclose(got, expected, atol=2e-3)


def test_preprocess_downscales_ucf101_frames_bilinearly_without_antialiasing():
  video = np.random.default_rng(1).integers(0, 256, (1, 16, 240, 320, 3), dtype=np.uint8)
  mean = np.array([90.0, 98.0, 102.0], np.float32)  # per-channel: broadcasts like a mean clip
  got = np.asarray(jax.jit(c3d.preprocess)(jnp.asarray(video), jnp.asarray(mean)))
  expected = bilinear_resize(video, 128, 171) - mean
  np.testing.assert_allclose(got, expected[:, :, 8:120, 29:141], atol=1e-2)


@pytest.mark.parametrize("frames, indices", [
    (5, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]),
    (7, [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5, 6, 6]),
    (1, [0] * 16),
])
def test_preprocess_repeats_the_frames_of_short_clips_in_order(frames, indices):
  video = (10 * np.arange(frames, dtype=np.uint8).reshape(1, frames, 1, 1, 1)
           * np.ones((1, frames, 4, 4, 3), np.uint8))
  got = np.asarray(jax.jit(c3d.preprocess)(jnp.asarray(video), jnp.zeros((16, 128, 171, 3))))
  np.testing.assert_allclose(got[0, :, 50, 50, 1], 10.0 * np.array(indices), atol=1e-4)
