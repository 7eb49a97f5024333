"""A gs:// workdir: paths keep their scheme, and every file goes through epath (or Orbax/TF).

There is no Cloud Storage here, so ``fake_gcs`` keeps ``gs://bucket/key`` objects as files under
a local folder: epath gets a backend for the ``gs`` scheme (instead of TensorFlow's gfile),
Orbax's TensorStore spec for a gs:// path gets the local file driver, and clu's TensorBoard
writer (TensorFlow's own gs:// support) a local logdir. The code under test still sees and
passes around ``gs://`` strings; anything that turns one into a local path (``pathlib`` makes
``gs:/bucket``, a relative folder) or writes it with a local-only library fails these tests,
since the working directory is checked to stay empty.
"""

import json
import os
from collections.abc import Iterator

import numpy as np
import orbax.checkpoint._src.path.gcs_utils as orbax_gcs_utils
import pytest
from clu import metric_writers
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from helpers import load_config

from vqvdm_jax import checkpointing, fileio, video_io
from vqvdm_jax import main as main_lib
from vqvdm_jax import workdir as workdir_lib
from vqvdm_jax.data import latents as latents_lib
from vqvdm_jax.training import diffusion_trainer

WORKDIR = "gs://bucket/run"


class BucketsInAFolder(epath_backend.Backend):
  """epath backend for gs:// that stores ``gs://bucket/key`` as ``<root>/bucket/key``.

  As in a bucket, writing an object needs no folder before it: its parents are made locally.
  """

  def __init__(self, root: str):
    self.root = root
    self.local = epath_backend.os_backend

  def path(self, uri) -> str:
    uri = os.fspath(uri)
    assert uri.startswith("gs://"), f"{uri} reached the gs:// backend without its scheme"
    return os.path.join(self.root, uri[len("gs://"):])

  def uri(self, path) -> str:
    return "gs://" + os.path.relpath(os.fspath(path), self.root)

  def object_path(self, uri) -> str:
    """The local file of an object about to be written, its parent folders made."""
    path = self.path(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path

  def open(self, path, mode):
    if "r" in mode:
      return self.local.open(self.path(path), mode)
    return self.local.open(self.object_path(path), mode)

  def exists(self, path):
    return self.local.exists(self.path(path))

  def isdir(self, path):
    return self.local.isdir(self.path(path))

  def listdir(self, path):
    return self.local.listdir(self.path(path))

  def glob(self, path):
    return [self.uri(match) for match in self.local.glob(self.path(path))]

  def walk(self, top, *, top_down=True, on_error=None) -> Iterator:
    for folder, folders, files in self.local.walk(self.path(top), top_down=top_down,
                                                  on_error=on_error):
      yield self.uri(folder), folders, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    self.local.makedirs(self.path(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    self.local.mkdir(self.path(path), exist_ok=exist_ok, mode=mode)

  def rmtree(self, path):
    self.local.rmtree(self.path(path))

  def remove(self, path):
    self.local.remove(self.path(path))

  def rename(self, path, dst):
    self.local.rename(self.path(path), self.object_path(dst))

  def replace(self, path, dst):
    self.local.replace(self.path(path), self.object_path(dst))

  def copy(self, path, dst, overwrite):
    self.local.copy(self.path(path), self.object_path(dst), overwrite=overwrite)

  def stat(self, path):
    return self.local.stat(self.path(path))


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """Cloud Storage as ``tmp_path/gcs``; the test runs in the empty folder ``tmp_path/cwd``."""
  buckets = BucketsInAFolder(str(tmp_path / "gcs"))
  os.makedirs(buckets.root)
  monkeypatch.setattr(gpath, "_PREFIX_TO_BACKEND", {**gpath._PREFIX_TO_BACKEND, "gs": buckets})
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else gs:// goes to gfile
  monkeypatch.setattr(orbax_gcs_utils, "get_kvstore_for_gcs",
                      lambda path: {"driver": "file", "path": buckets.path(path)})
  monkeypatch.setattr(orbax_gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  create_writer = metric_writers.create_default_writer

  def local_summaries(logdir, **kwargs):
    return create_writer(buckets.path(logdir), **kwargs)

  monkeypatch.setattr(metric_writers, "create_default_writer", local_summaries)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield buckets
  assert not os.listdir(cwd), "a gs:// path was written as a local (relative) path"


def _video(frames=4, size=16, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def test_workdir_paths_keep_the_gs_scheme():
  assert str(workdir_lib.vqgan_dir(WORKDIR)) == "gs://bucket/run/vqgan"
  assert str(workdir_lib.diffusion_dir(WORKDIR)) == "gs://bucket/run/diffusion"
  assert str(latents_lib.cache_directory(WORKDIR, 12)) == (
      "gs://bucket/run/diffusion/latents/tokenizer_0000012")
  assert str(fileio.absolute(WORKDIR + "/vqgan/checkpoints")) == "gs://bucket/run/vqgan/checkpoints"


def test_local_paths_stay_local_and_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert not fileio.is_remote("workdirs/run") and fileio.is_remote(WORKDIR)
  assert str(fileio.absolute("workdirs/run")) == str(tmp_path / "workdirs" / "run")
  assert str(workdir_lib.vqgan_dir("workdirs/run")) == "workdirs/run/vqgan"


def test_checkpointer_saves_and_restores_under_a_gs_workdir(fake_gcs):
  checkpointer = checkpointing.Checkpointer(WORKDIR + "/checkpoints", save_every=1, keep=2,
                                            async_save=False)
  assert str(checkpointer.directory) == "gs://bucket/run/checkpoints"
  state = {"weights": np.arange(6, dtype=np.float32).reshape(2, 3)}
  assert checkpointer.save(3, state)
  restored = checkpointer.restore(state)
  checkpointer.close()
  np.testing.assert_array_equal(restored["weights"], state["weights"])
  assert os.path.isdir(fake_gcs.path("gs://bucket/run/checkpoints/3"))


def test_videos_are_written_to_and_read_from_gs(fake_gcs, tmp_path):
  video = _video()
  local = video_io.write_mp4(tmp_path / "local.mp4", video, fps=8)
  remote = video_io.write_mp4("gs://bucket/videos/clip.mp4", video, fps=8)
  assert str(remote) == "gs://bucket/videos/clip.mp4"
  with open(fake_gcs.path(remote), "rb") as file:
    assert file.read() == local.read_bytes()  # the same encoder output, wherever it lands
  frames, fps = video_io.read_video(remote)
  np.testing.assert_array_equal(frames, video_io.read_video(local)[0])
  assert fps == pytest.approx(8.0)
  gif, mp4 = video_io.write_comparison_grid("gs://bucket/eval/step_1", video[None], video[None],
                                            fps=8)
  assert os.path.isfile(fake_gcs.path(gif)) and os.path.isfile(fake_gcs.path(mp4))


def test_numpy_arrays_round_trip_through_gs(fake_gcs):
  array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  fileio.save_npy("gs://bucket/cache/latents.npy", array)
  np.testing.assert_array_equal(np.load(fake_gcs.path("gs://bucket/cache/latents.npy")), array)
  np.testing.assert_array_equal(
      fileio.load_numpy("gs://bucket/cache/latents.npy", mmap_mode="r"), array)
  fileio.save_npz("gs://bucket/cache/features.npz", features=array, key=np.asarray("k"))
  with fileio.load_numpy("gs://bucket/cache/features.npz") as loaded:
    np.testing.assert_array_equal(loaded["features"], array)
    assert str(loaded["key"]) == "k"


def test_train_mode_checkpoints_and_resumes_in_a_gs_workdir(fake_gcs, monkeypatch):
  """The tiny config through both stages and samples, then stage 2 resumed, all on gs://."""
  config = load_config("tiny")
  config.vqgan.train.num_steps = config.vqgan.train.eval_every = 2
  config.diffusion.train.num_steps = 2
  main_lib.run("train", config, WORKDIR)
  root = epath.Path(WORKDIR)
  for checkpoint in ("vqgan/checkpoints/2", "diffusion/checkpoints/2"):
    assert os.path.isdir(fake_gcs.path(root / checkpoint))
  assert (root / "vqgan" / "reconstructions" / "step_0000002.mp4").exists()
  assert len(latents_lib.LatentCache(latents_lib.cache_directory(WORKDIR, 2))) == (
      config.data.num_train_clips)
  info = json.loads((root / "samples" / "000" / "samples.json").read_text())
  assert info["step"] == 2
  assert len(list((root / "samples" / "000").glob("video_*.mp4"))) == config.diffusion.sample.num_videos
  assert os.listdir(fake_gcs.path(root / "vqgan" / "summaries"))  # TensorBoard event files

  def must_resume(*args):
    raise AssertionError("stage 2 started afresh instead of resuming its gs:// checkpoint")

  monkeypatch.setattr(diffusion_trainer.DiffusionTrainer, "initial_state", must_resume)
  config.diffusion.train.num_steps = 4  # a longer run: stage 2 goes on from step 2
  state = diffusion_trainer.train_diffusion(config, WORKDIR)
  assert int(state.step) == 4
  assert os.path.isdir(fake_gcs.path(root / "diffusion" / "checkpoints" / "4"))
