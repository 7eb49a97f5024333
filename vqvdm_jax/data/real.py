"""Reading prepared real datasets (``prepare.py``'s ArrayRecord files) without TensorFlow.

TFDS wrote ``<data_dir>/<dataset>/<variant>/<version>/<dataset>-<split>.array_record-*-of-*``
files of serialized ``tf.train.Example`` protos. grain's ``ArrayRecordDataSource`` reads the
records and TFDS's own copy of the Example proto (no TensorFlow import) parses them; only the
frames of the sampled clip are JPEG/PNG-decoded, with Pillow, so a step never decodes a whole
video. TFDS's ``as_data_source`` would decode every frame of a video per access and pulls in
TensorFlow, which training does not need.

The source yields ``{frames: list of encoded frames, label: int, fps: float}``; :class:`ClipSampler`
(a grain ``RandomMap``, so its randomness is a function of the seed and the element's position
in the stream and survives checkpointing) turns that into the pipeline's clip format
``{video: uint8 [T, H, W, 3], label: int32, fps: float32}``.
"""

from __future__ import annotations

import io
from typing import Any

import grain
import numpy as np
from etils import epath
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from vqvdm_jax.data import builders

DATASETS = tuple(builders.BUILDERS)
# The pipeline names the held-out split 'eval'; TFDS and the official lists call it 'test'.
SPLIT_NAMES = {"train": "train", "eval": "test"}


class DatasetNotPreparedError(FileNotFoundError):
  """The config names a real dataset that ``prepare.py`` has not written (yet)."""


def prepared_dir(data_config: Any) -> epath.Path:
  """``<data_dir>/<name>/<variant>/<version>``: where ``prepare.py`` wrote what the config reads.

  An epath: TFDS's ``data_dir`` may be a gs:// URI.
  """
  variant = builders.config_name(data_config.name, data_config.short_side,
                                 data_config.split_number)
  return (epath.Path(data_config.data_dir).expanduser() / data_config.name / variant
          / str(builders.VERSION))


def check_prepared(data_config: Any) -> epath.Path:
  """The prepared folder, or an error that says which prepare command to run."""
  command = builders.prepare_command(data_config.name, data_config.data_dir,
                                     data_config.short_side, data_config.split_number)
  if not data_config.data_dir:
    raise DatasetNotPreparedError(
        f"config.data.name={data_config.name!r} reads a prepared dataset, but "
        f"config.data.data_dir is not set. Prepare it once with\n  {command}\nthen pass "
        f"--config.data.data_dir=DATA_DIR (or --config.data.name=synthetic for the embedded data).")
  path = prepared_dir(data_config)
  if not (path / "dataset_info.json").is_file():
    raise DatasetNotPreparedError(
        f"config.data.name={data_config.name!r} is not prepared in {path} "
        f"(data_dir={data_config.data_dir}, short_side={data_config.short_side}"
        + (f", split_number={data_config.split_number}" if data_config.name == "ucf101" else "")
        + f"). Prepare it once with\n  {command}")
  return path


def num_prepared_classes(path: epath.Path) -> int:
  """Classes of a prepared dataset (TFDS writes one name a line); 0 when it has no labels."""
  labels = path / "label.labels.txt"
  return len(labels.read_text().splitlines()) if labels.exists() else 0


class EncodedVideos:
  """Random-access source of one prepared split: ``{frames: [bytes], label: int, fps: float}``.

  Picklable (grain sends it to worker processes): it holds the file names, and grain's
  ArrayRecord source reopens them where it is used.
  """

  def __init__(self, files: list[str]):
    self.files = files
    self._records = grain.sources.ArrayRecordDataSource(files)

  def __len__(self) -> int:
    return len(self._records)

  def __repr__(self) -> str:
    return f"EncodedVideos({len(self)} videos in {len(self.files)} file(s))"

  def __getitem__(self, index: int) -> dict[str, Any]:
    feature = tf_example_pb2.Example.FromString(self._records[index]).features.feature
    return {"frames": list(feature["video"].bytes_list.value),
            "label": int(feature["label"].int64_list.value[0]),
            "fps": float(feature["fps"].float_list.value[0])}


def make_source(data_config: Any, split: str) -> EncodedVideos:
  """The prepared split ('train' or 'eval') that ``config.data`` names, checked against it."""
  if split not in SPLIT_NAMES:
    raise ValueError(f"Unknown split {split!r}; expected one of {tuple(SPLIT_NAMES)}.")
  path = check_prepared(data_config)
  classes = num_prepared_classes(path)
  if classes != data_config.num_classes:
    raise ValueError(
        f"config.data.num_classes={data_config.num_classes}, but the prepared "
        f"{data_config.name} in {path} has {classes} classes"
        + (" (no labels)" if not classes else "")
        + f"; set --config.data.num_classes={classes}.")
  pattern = f"{data_config.name}-{SPLIT_NAMES[split]}.array_record-*"
  files = sorted(str(file) for file in path.glob(pattern))
  if not files:
    raise DatasetNotPreparedError(f"{path} has no {pattern} files; prepare it again with\n  "
                                  + builders.prepare_command(
                                      data_config.name, data_config.data_dir,
                                      data_config.short_side, data_config.split_number))
  return EncodedVideos(files)


def clip_indices(num_frames_available: int, num_frames: int, frame_stride: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, int]:
  """Frame indices of a random clip, and the stride used.

  The stride shrinks (down to 1) for videos too short for ``num_frames`` at ``frame_stride``; a
  video shorter than the clip itself (only if it was prepared with a smaller ``min_frames``)
  repeats its last frame.
  """
  stride = frame_stride
  if num_frames > 1:
    stride = max(1, min(frame_stride, (num_frames_available - 1) // (num_frames - 1)))
  span = (num_frames - 1) * stride + 1
  start = int(rng.integers(0, max(num_frames_available - span, 0) + 1))
  indices = np.minimum(start + stride * np.arange(num_frames), num_frames_available - 1)
  return indices, stride


def decode_frame(encoded: bytes, resolution: int) -> np.ndarray:
  """JPEG/PNG bytes -> uint8 ``[resolution, resolution, 3]``: short side resized, centre cropped."""
  with Image.open(io.BytesIO(encoded)) as image:
    # JPEG can decode at 1/2, 1/4, 1/8 scale for free when the stored frames are much larger.
    image.draft("RGB", (resolution, resolution))
    image = image.convert("RGB")
    side = min(image.width, image.height)
    left, top = (image.width - side) / 2, (image.height - side) / 2
    # One resampling from the central square: resize-short-side-then-crop without a copy.
    image = image.resize((resolution, resolution), Image.Resampling.BILINEAR,
                         box=(left, top, left + side, top + side))
    return np.asarray(image)


class ClipSampler(grain.transforms.RandomMap):
  """A random ``num_frames`` clip every ``frame_stride`` frames, at the model's resolution.

  ``fps`` is the clip's frame rate: the video's divided by the stride (0 stays 0, unknown).
  Videos without labels (stored as -1) get label 0, as the synthetic unconditional data does.
  """

  def __init__(self, num_frames: int, resolution: int, frame_stride: int):
    self.num_frames = int(num_frames)
    self.resolution = int(resolution)
    self.frame_stride = int(frame_stride)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    frames = element["frames"]
    indices, stride = clip_indices(len(frames), self.num_frames, self.frame_stride, rng)
    video = np.stack([decode_frame(frames[index], self.resolution) for index in indices])
    return {"video": video, "label": np.int32(max(element["label"], 0)),
            "fps": np.float32(element["fps"] / stride)}


def clip_sampler(data_config: Any) -> ClipSampler:
  return ClipSampler(data_config.num_frames, data_config.resolution, data_config.frame_stride)
