r"""Prepares a real dataset once, with TFDS, as ArrayRecord files that training reads with grain.

  python -m vqvdm_jax.data.prepare --dataset=ucf101 --source_dir=/data/UCF101 --data_dir=/data/tfds
  python -m vqvdm_jax.data.prepare --dataset=sky_timelapse --source_dir=/data/sky --data_dir=...
  python -m vqvdm_jax.data.prepare --dataset=video_folder --source_dir=/data/videos --data_dir=...

The source layouts are described in ``vqvdm_jax/data/builders.py`` and the README. Training then
reads ``<data_dir>/<dataset>/<variant>/`` with ``--config.data.data_dir=<data_dir>`` (and the same
``short_side`` / ``split_number``). Unreadable videos and videos shorter than one clip are
skipped; the summary at the end lists them and is also written to ``skipped_videos.txt`` in the
prepared folder.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys

from absl import app, flags, logging

from vqvdm_jax.data import builders

SKIPPED_FILE = "skipped_videos.txt"
DATASETS = tuple(builders.BUILDERS)


@dataclasses.dataclass
class Summary:
  """What a prepare run wrote and what it left out."""

  data_path: pathlib.Path
  num_examples: dict[str, int]
  skipped: list[tuple[str, str]]

  def __str__(self) -> str:
    counts = ", ".join(f"{split}: {count}" for split, count in self.num_examples.items())
    lines = [f"Prepared {self.data_path} ({counts}); skipped {len(self.skipped)} video(s)."]
    lines += [f"  {path}: {reason}" for path, reason in self.skipped]
    return "\n".join(lines)


class NoVideosKeptError(ValueError):
  """A split of the source kept no video: every one was unreadable, too short or unlisted."""

  MAX_LISTED = 10

  def __init__(self, source_dir: pathlib.Path, split: str | None,
               skipped: list[tuple[str, str]]):
    lines = [(f"{source_dir}: the {split or ''} split kept none of its videos; nothing was "
              f"prepared. Skipped {len(skipped)} video(s):")]
    lines += [f"  {path}: {reason}" for path, reason in skipped[:self.MAX_LISTED]]
    if len(skipped) > self.MAX_LISTED:
      lines.append(f"  ... and {len(skipped) - self.MAX_LISTED} more")
    lines.append("Check the source layout (see vqvdm_jax/data/builders.py) and that the videos "
                 "decode (ffmpeg -i FILE).")
    super().__init__("\n".join(lines))
    self.skipped = skipped


def prepare(dataset: str, source_dir: str | pathlib.Path, data_dir: str | pathlib.Path, *,
            short_side: int = 128, split_number: int = 1, min_frames: int = 16,
            frame_format: str = "jpeg", jpeg_quality: int = 90, test_fraction: float = 0.1,
            split_seed: int = 0, num_threads: int = 1) -> Summary:
  """Builds ``<data_dir>/<dataset>/<variant>/<version>/`` from ``source_dir`` unless it exists.

  Raises:
    FileNotFoundError: the source folder or a split list is missing (nothing is written).
    ValueError: an unknown dataset or option.
    NoVideosKeptError: a split kept no video (the skipped ones and why are in the message).
  """
  if dataset not in builders.BUILDERS:
    raise ValueError(f"--dataset={dataset!r} is not one of {DATASETS}.")
  if frame_format not in ("jpeg", "png"):
    raise ValueError(f"--frame_format={frame_format!r}: choose 'jpeg' or 'png'.")
  if dataset == "ucf101" and split_number not in (1, 2, 3):
    raise ValueError(f"--split_number={split_number}: UCF-101 has official splits 1, 2, 3.")
  if short_side < 1 or min_frames < 1 or not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"Need --short_side >= 1, --min_frames >= 1 and 0 <= --test_fraction < 1; "
                     f"got {short_side}, {min_frames}, {test_fraction}.")
  builder_class = builders.BUILDERS[dataset]
  config = builders.VideoBuilderConfig(
      name=builders.config_name(dataset, short_side, split_number), short_side=short_side,
      split_number=split_number, min_frames=min_frames, frame_format=frame_format,
      jpeg_quality=jpeg_quality, test_fraction=test_fraction, split_seed=split_seed)
  source_dir = pathlib.Path(source_dir).expanduser()
  builder_class.check_source(source_dir, config)
  builder = builder_class(source_dir=source_dir, config=config, num_threads=num_threads,
                          data_dir=str(pathlib.Path(data_dir).expanduser()),
                          file_format="array_record")
  data_path = pathlib.Path(builder.data_dir)
  skipped_file = data_path / SKIPPED_FILE
  if builder.is_prepared():
    logging.info("%s is already prepared; nothing to do.", data_path)
    skipped = [tuple(line.split("\t", 1)) for line in skipped_file.read_text().splitlines()
               if line] if skipped_file.exists() else []
  else:
    try:
      builder.download_and_prepare()
    except AssertionError as error:  # TFDS's "No examples were yielded" for an empty split
      if "No examples were yielded" not in str(error):
        raise
      raise NoVideosKeptError(source_dir, builder.generating_split, builder.skipped) from None
    skipped = builder.skipped
    skipped_file.write_text("".join(f"{path}\t{reason}\n" for path, reason in skipped))
  num_examples = {split: info.num_examples for split, info in builder.info.splits.items()}
  return Summary(data_path=data_path, num_examples=num_examples, skipped=skipped)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so importing prepare() adds no global flags."""
  flags.DEFINE_enum("dataset", None, DATASETS, "Which source layout to read.")
  flags.DEFINE_string("source_dir", None, "The unpacked dataset (see the layouts above).")
  flags.DEFINE_string("data_dir", None, "Where to write; training's --config.data.data_dir.")
  flags.DEFINE_integer("short_side", 128, "Frames are stored resized to this shorter edge.")
  flags.DEFINE_integer("split_number", 1, "ucf101: the official split, 1, 2 or 3.")
  flags.DEFINE_integer("min_frames", 16, "Skip videos shorter than this (one clip).")
  flags.DEFINE_enum("frame_format", "jpeg", ["jpeg", "png"], "How frames are encoded.")
  flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality (1-95) of 'jpeg' frames.")
  flags.DEFINE_float("test_fraction", 0.1, "video_folder: share of videos in the test split.")
  flags.DEFINE_integer("split_seed", 0, "video_folder: seed of the path hash that splits.")
  flags.DEFINE_integer("num_threads", os.cpu_count() or 1, "Videos decoded at the same time.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  try:
    summary = prepare(
        FLAGS.dataset, FLAGS.source_dir, FLAGS.data_dir, short_side=FLAGS.short_side,
        split_number=FLAGS.split_number, min_frames=FLAGS.min_frames,
        frame_format=FLAGS.frame_format, jpeg_quality=FLAGS.jpeg_quality,
        test_fraction=FLAGS.test_fraction, split_seed=FLAGS.split_seed,
        num_threads=FLAGS.num_threads)
  except (FileNotFoundError, ValueError) as error:  # what the user can fix: no traceback
    sys.stderr.write(f"Error: {error}\n")
    sys.exit(2)
  print(summary)
  if summary.skipped:
    print(f"(also listed in {summary.data_path / SKIPPED_FILE})")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["dataset", "source_dir", "data_dir"])
  app.run(main)
