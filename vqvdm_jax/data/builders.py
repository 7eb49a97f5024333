"""TFDS builders that turn videos on disk into ArrayRecord datasets of encoded frames.

Three layouts, one feature set (so one reader serves them all):

- ``ucf101``: ``<source>/UCF-101/<Class>/v_<Class>_gXX_cYY.avi`` with the official split lists
  ``<source>/ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt``; label = classInd index
  (0-based), FPS read from the container.
- ``sky_timelapse``: frame folders ``<source>/sky_train/<video>/<clip>/*.jpg`` (and ``sky_test``);
  one example per clip folder, frames sorted by name; no label, no FPS.
- ``video_folder``: any tree ``<source>/<class>/<file>`` of mp4/avi/webm/mkv/mov (class from the
  first folder; a flat folder has no labels), split into train/test by a seeded hash of the path.

Every example is ``{video: frames encoded as JPEG/PNG, resized to a short side; label: int64
(-1 when the dataset has none); fps: float32 (0 when unknown); name: the source path}``. Videos
are decoded with PyAV (``video_io.read_video``); frames are encoded with Pillow, so the builders
never go through TensorFlow's image ops.

Files that cannot be read (zero-length, truncated, not a video) and videos shorter than
``min_frames`` are skipped, not fatal: each builder keeps a list of ``(path, reason)`` in
``skipped`` for the summary that ``prepare.py`` prints and writes beside the dataset.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vqvdm_jax import video_io

VERSION = tfds.core.Version("1.0.0")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
NO_LABEL = -1
SPLITS = ("train", "test")


@dataclasses.dataclass(eq=False)
class VideoBuilderConfig(tfds.core.BuilderConfig):
  """What a prepared variant was made with; the name (see :func:`config_name`) says the rest.

  Attributes:
    short_side: frames are stored resized so their shorter edge has this many pixels.
    split_number: ucf101's official split (1, 2 or 3).
    min_frames: videos with fewer frames are skipped (shorter than one clip).
    frame_format: 'jpeg' (small) or 'png' (lossless).
    jpeg_quality: Pillow's JPEG quality for 'jpeg' frames.
    test_fraction: video_folder: share of the videos hashed into the test split.
    split_seed: video_folder: seed of that hash.
  """

  short_side: int = 128
  split_number: int = 1
  min_frames: int = 16
  frame_format: str = "jpeg"
  jpeg_quality: int = 90
  test_fraction: float = 0.1
  split_seed: int = 0


def config_name(dataset: str, short_side: int, split_number: int = 1) -> str:
  """The TFDS config (a folder under ``<data_dir>/<dataset>/``) of one prepared variant."""
  if dataset == "ucf101":
    return f"split{split_number}_short{short_side}"
  return f"short{short_side}"


def prepare_command(dataset: str, data_dir: str | pathlib.Path, short_side: int,
                    split_number: int = 1) -> str:
  """The command line that prepares what a config asks for (used in 'not prepared' errors)."""
  command = (f"python -m vqvdm_jax.data.prepare --dataset={dataset} --source_dir=SOURCE "
             f"--data_dir={data_dir or 'DATA_DIR'} --short_side={short_side}")
  if dataset == "ucf101":
    command += f" --split_number={split_number}"
  return command


def encode_frames(frames: np.ndarray, frame_format: str, jpeg_quality: int) -> list[bytes]:
  """uint8 ``[T, H, W, 3]`` -> one JPEG or PNG byte string per frame."""
  encoded = []
  for frame in frames:
    buffer = io.BytesIO()
    if frame_format == "jpeg":
      Image.fromarray(frame).save(buffer, format="JPEG", quality=jpeg_quality)
    else:
      Image.fromarray(frame).save(buffer, format="PNG")
    encoded.append(buffer.getvalue())
  return encoded


def _map_ahead(pool: concurrent.futures.Executor, function: Callable[[Any], Any],
               items: Iterable[Any], window: int) -> Iterator[Any]:
  """``map(function, items)`` in order, at most ``window`` calls ahead of the consumer.

  PyAV and Pillow release the GIL while decoding and encoding, so threads decode several videos
  at once; the window bounds how many decoded videos wait in memory for the writer.
  """
  pending: collections.deque = collections.deque()
  for item in items:
    pending.append(pool.submit(function, item))
    if len(pending) >= window:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()


def _require_dir(path: pathlib.Path, what: str, prepare_hint: str) -> None:
  if not path.is_dir():
    raise FileNotFoundError(f"{path} does not exist or is not a folder: {what}. {prepare_hint}")


def _require_file(path: pathlib.Path, what: str, prepare_hint: str) -> None:
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: {what}. {prepare_hint}")


class _VideoBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared features, frame encoding and skip bookkeeping; subclasses list the videos.

  Not registered with TFDS (its catalogue has its own ``ucf101``): ``prepare.py`` instantiates
  the builders, and training reads their ArrayRecord files directly (``real.py``).
  """

  VERSION = VERSION
  RELEASE_NOTES = {"1.0.0": "Frames resized to a short side and stored JPEG/PNG-encoded."}
  BUILDER_CONFIG_CLASS = VideoBuilderConfig
  LAYOUT = ""  # how the source folder must look, for error messages.

  def __init__(self, *, source_dir: os.PathLike | str, num_threads: int = 1, **kwargs: Any):
    self.source_dir = pathlib.Path(source_dir)
    self.num_threads = max(1, num_threads)
    self.skipped: list[tuple[str, str]] = []
    self.generating_split: str | None = None
    super().__init__(**kwargs)

  @classmethod
  def check_source(cls, source_dir: pathlib.Path, config: VideoBuilderConfig) -> None:
    """Fails at once, before anything is written, when the source layout is not there."""
    raise NotImplementedError

  def class_names(self) -> list[str] | None:
    """Class names in label order, or None for an unlabelled dataset."""
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    names = self.class_names()
    label = (tfds.features.ClassLabel(names=names) if names
             else tfds.features.Scalar(np.int64, doc=f"{NO_LABEL}: no label"))
    frame_format = self.builder_config.frame_format
    return self.dataset_info_from_configs(
        description=f"Videos from {self.LAYOUT}, frames resized to a short side of "
                    f"{self.builder_config.short_side} and stored as {frame_format}.",
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Video(shape=(None, None, None, 3),
                                         encoding_format=frame_format),
            "label": label,
            "fps": tfds.features.Scalar(np.float32, doc="0: unknown"),
            "name": tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # everything is already on disk in source_dir.
    self.check_source(self.source_dir, self.builder_config)
    # TFDS cannot write an empty split; one with no videos at all is left out (a tiny folder).
    return {split: self._generate_examples(split) for split in SPLITS
            if next(iter(self.list_videos(split)), None) is not None}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    videos = list(self.list_videos(split))
    self.generating_split = split  # named by prepare's error when a split keeps no video
    with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
      loaded = _map_ahead(pool, self._load, [path for _, path, _ in videos], 2 * self.num_threads)
      for (key, path, label), (frames, fps, reason) in zip(videos, loaded):
        if label is None:
          frames, reason = None, "its class is not in the class list"
        if frames is None:
          self.skipped.append((str(path), reason))
          continue
        yield key, {"video": frames, "label": label, "fps": np.float32(fps), "name": key}

  def _load(self, path: pathlib.Path) -> tuple[list[bytes] | None, float, str]:
    """``(encoded frames, fps, "")``, or ``(None, 0, why)`` for a video to skip."""
    config = self.builder_config
    try:
      frames, fps = self.read_frames(path)
    except (ValueError, OSError) as error:
      message = str(error)  # the summary names the file already; don't repeat it up front.
      return None, 0.0, message.removeprefix(str(path)).lstrip(" :") or "unreadable"
    if len(frames) < config.min_frames:
      return None, 0.0, (f"{len(frames)} frames, fewer than one clip "
                         f"(min_frames={config.min_frames})")
    return encode_frames(frames, config.frame_format, config.jpeg_quality), fps, ""

  def list_videos(self, split: str) -> Iterator[tuple[str, pathlib.Path, int | None]]:
    """``(unique key, path, label)`` of every video of ``split``; label None: skip it."""
    raise NotImplementedError

  def read_frames(self, path: pathlib.Path) -> tuple[np.ndarray, float]:
    """uint8 ``[T, H, W, 3]`` frames at the configured short side, and the frame rate."""
    return video_io.read_video(path, short_side=self.builder_config.short_side)


class Ucf101(_VideoBuilder, skip_registration=True):
  """UCF-101 from the official archive and split lists (101 classes, 13,320 videos)."""

  name = "ucf101"
  LAYOUT = ("UCF-101/<Class>/v_<Class>_gXX_cYY.avi with ucfTrainTestlist/classInd.txt, "
            "trainlist0N.txt and testlist0N.txt")

  @classmethod
  def check_source(cls, source_dir: pathlib.Path, config: VideoBuilderConfig) -> None:
    hint = f"Expected {cls.LAYOUT} under --source_dir (the unpacked UCF101.rar and split zip)."
    _require_dir(source_dir / "UCF-101", "the folder of class folders", hint)
    for list_name in ("classInd.txt", f"trainlist0{config.split_number}.txt",
                      f"testlist0{config.split_number}.txt"):
      _require_file(source_dir / "ucfTrainTestlist" / list_name, "an official split list", hint)

  def class_names(self) -> list[str]:
    self.check_source(self.source_dir, self.builder_config)
    lines = (self.source_dir / "ucfTrainTestlist" / "classInd.txt").read_text().split()
    indexed = {int(index): name for index, name in zip(lines[::2], lines[1::2])}
    return [indexed[index] for index in sorted(indexed)]

  def list_videos(self, split: str) -> Iterator[tuple[str, pathlib.Path, int]]:
    label_of = {name: label for label, name in enumerate(self.class_names())}
    list_file = f"{split}list0{self.builder_config.split_number}.txt"
    for line in (self.source_dir / "ucfTrainTestlist" / list_file).read_text().splitlines():
      if not line.strip():
        continue
      relative = line.split()[0]  # trainlists add "<label>"; the folder is the class either way.
      yield relative, self._find(relative), label_of.get(relative.split("/")[0])

  def _find(self, relative: str) -> pathlib.Path:
    """The file a list line names; the lists and the archive disagree on case for a few files."""
    path = self.source_dir / "UCF-101" / relative
    if path.exists():
      return path
    return self._files_by_lowercase.get(relative.lower(), path)

  @functools.cached_property
  def _files_by_lowercase(self) -> dict[str, pathlib.Path]:
    root = self.source_dir / "UCF-101"
    return {file.relative_to(root).as_posix().lower(): file
            for file in root.rglob("*") if file.is_file()}


class SkyTimelapse(_VideoBuilder, skip_registration=True):
  """Sky Time-lapse (Xiong et al. 2018) as frame folders; unconditional, no frame rate."""

  name = "sky_timelapse"
  LAYOUT = "sky_train/<video>/<clip>/*.jpg and sky_test/<video>/<clip>/*.jpg"

  @classmethod
  def check_source(cls, source_dir: pathlib.Path, config: VideoBuilderConfig) -> None:
    hint = f"Expected {cls.LAYOUT} under --source_dir."
    for split in SPLITS:
      _require_dir(source_dir / f"sky_{split}", f"the {split} split's frame folders", hint)

  def list_videos(self, split: str) -> Iterator[tuple[str, pathlib.Path, int]]:
    root = self.source_dir / f"sky_{split}"
    for clip in sorted(path for path in root.glob("*/*") if path.is_dir()):
      yield str(clip.relative_to(self.source_dir)), clip, NO_LABEL

  def read_frames(self, path: pathlib.Path) -> tuple[np.ndarray, float]:
    files = sorted(file for file in path.iterdir() if file.suffix.lower() in FRAME_EXTENSIONS)
    frames = []
    for file in files:
      try:
        with Image.open(file) as image:
          image = image.convert("RGB")
          height, width = video_io.resized_shape((image.height, image.width),
                                                 self.builder_config.short_side)
          frames.append(np.asarray(image.resize((width, height), Image.Resampling.BOX)))
      except OSError as error:
        raise ValueError(f"{file} could not be decoded as an image: {error}") from error
    if frames and any(frame.shape != frames[0].shape for frame in frames):
      raise ValueError(f"{path} mixes frame sizes.")
    return np.stack(frames) if frames else np.zeros((0, 1, 1, 3), np.uint8), 0.0


class VideoFolder(_VideoBuilder, skip_registration=True):
  """Any folder of videos: ``<root>/<class>/<file>`` (labelled) or ``<root>/<file>`` (not)."""

  name = "video_folder"
  LAYOUT = "<class>/<file> (or a flat folder of files) with extensions " + "/".join(
      VIDEO_EXTENSIONS)

  @classmethod
  def check_source(cls, source_dir: pathlib.Path, config: VideoBuilderConfig) -> None:
    _require_dir(source_dir, "the folder of videos", f"Expected {cls.LAYOUT} under --source_dir.")
    if not cls._videos(source_dir):
      raise FileNotFoundError(f"{source_dir} holds no video file ({cls.LAYOUT}).")

  @staticmethod
  def _videos(source_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(path.relative_to(source_dir) for path in source_dir.rglob("*")
                  if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file())

  def class_names(self) -> list[str] | None:
    videos = self._videos(self.source_dir)
    flat = [str(path) for path in videos if len(path.parts) == 1]
    if len(flat) == len(videos):
      return None
    if flat:
      raise ValueError(
          f"{self.source_dir} mixes videos in class folders with {len(flat)} videos at its top "
          f"level (e.g. {flat[0]}); move those into a class folder, or all videos to the top "
          f"level for an unlabelled dataset.")
    return sorted({path.parts[0] for path in videos})

  def split_of(self, relative: pathlib.Path) -> str:
    """'test' for a seeded-hash share of ``test_fraction`` of the paths, else 'train'."""
    config = self.builder_config
    # A cryptographic hash, because CRCs of paths that differ in one character barely differ.
    digest = hashlib.sha256(f"{config.split_seed}:{relative.as_posix()}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < config.test_fraction else "train"

  def list_videos(self, split: str) -> Iterator[tuple[str, pathlib.Path, int]]:
    names = self.class_names()
    label_of = {name: label for label, name in enumerate(names or [])}
    for relative in self._videos(self.source_dir):
      if self.split_of(relative) == split:
        label = label_of[relative.parts[0]] if names else NO_LABEL
        yield relative.as_posix(), self.source_dir / relative, label


BUILDERS: dict[str, type[_VideoBuilder]] = {
    builder.name: builder for builder in (Ucf101, SkyTimelapse, VideoFolder)}
