"""Writing videos for people to look at: GIF and MP4 files and side-by-side grids.

Everything here takes uint8 ``[T, H, W, 3]`` videos (channel-last), the format the input pipeline
produces; convert model outputs first with ``vqvdm_jax.data.pipeline.to_uint8``. GIFs play
anywhere (TensorBoard, notebooks, GitHub); MP4s are smaller and keep colours exact enough for a
closer look. MP4s are encoded and decoded in-process by PyAV (its wheels bundle FFmpeg, so no
system ffmpeg is needed). In-process matters: launching an ffmpeg binary forks the training
process, and a fork from a process running JAX, grain and Orbax threads can deadlock.

Paths may be local or remote (``gs://``, see :mod:`vqvdm_jax.fileio`): files are encoded in
memory and written with epath, so a workdir on Cloud Storage needs no local scratch copy.
"""

from __future__ import annotations

import fractions
import io
import os
from typing import Any

import av
import imageio.v3 as imageio_v3
import numpy as np
from etils import epath

from vqvdm_jax import fileio

PathLike = fileio.PathLike


def _as_uint8_video(video: Any, name: str = "video", ndim: int = 4) -> np.ndarray:
  """Checks dtype and layout once, so each writer fails with a message instead of garbage."""
  video = np.asarray(video)
  if video.dtype != np.uint8:
    raise TypeError(
        f"{name} must be uint8 in [0, 255], got dtype {video.dtype}; convert model outputs in "
        f"[-1, 1] with vqvdm_jax.data.pipeline.to_uint8 first.")
  if video.ndim != ndim or video.shape[-1] != 3:
    layout = "[T, H, W, 3]" if ndim == 4 else "[N, T, H, W, 3]"
    raise ValueError(f"{name} must have layout {layout}, got shape {video.shape}.")
  return video


def _write_file(path: PathLike, data: bytes) -> epath.Path:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return path


def write_gif(path: PathLike, video: Any, fps: float) -> epath.Path:
  """Writes a looping GIF of a uint8 ``[T, H, W, 3]`` video at ``fps`` frames per second.

  GIF stores frame delays in hundredths of a second, so rates above 100 fps are not possible and
  others are rounded (16 fps plays at ~16.7). Pillow merges consecutive identical frames into one
  longer frame: the playback time is right but the file may hold fewer than ``T`` frames.
  """
  video = _as_uint8_video(video)
  data = imageio_v3.imwrite("<bytes>", video, extension=".gif", duration=1000.0 / fps, loop=0)
  return _write_file(path, data)


def write_mp4(path: PathLike, video: Any, fps: float) -> epath.Path:
  """Writes an H.264 MP4 of a uint8 ``[T, H, W, 3]`` video at ``fps`` frames per second.

  H.264 in yuv420p needs even heights and widths, so an odd edge is padded by repeating the last
  row or column. Frames are never resized, so tiny (16x16) videos stay pixel-aligned.
  """
  video = _as_uint8_video(video)
  pad_height, pad_width = video.shape[1] % 2, video.shape[2] % 2
  if pad_height or pad_width:
    video = np.pad(video, ((0, 0), (0, pad_height), (0, pad_width), (0, 0)), mode="edge")
  # 29.97 fps is 30000/1001: a bounded denominator keeps NTSC rates exact in the container.
  rate = fractions.Fraction(fps).limit_denominator(1001)
  buffer = io.BytesIO()  # seekable, so the muxer writes the index as it would into a file.
  with av.open(buffer, mode="w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=rate)
    stream.height, stream.width = video.shape[1:3]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "17"}  # near-lossless to the eye, still ~10x smaller than raw.
    for frame in video:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())  # flushes the frames the encoder still holds.
  return _write_file(path, buffer.getvalue())


def read_video(path: PathLike, short_side: int | None = None) -> tuple[np.ndarray, float]:
  """Decodes every frame of a video file: ``(uint8 [T, H, W, 3] RGB frames, frames per second)``.

  With ``short_side``, frames are resized while decoding (area averaging) so that their shorter
  edge has that many pixels and the aspect ratio is kept: far cheaper than resizing full-size
  RGB frames afterwards.

  Raises ``ValueError`` naming the file when it cannot be opened or holds no decodable frame
  (zero-length, truncated before the first frame, not a video at all).
  """
  # A remote file is read into memory first: FFmpeg cannot open gs:// itself.
  source = io.BytesIO(epath.Path(path).read_bytes()) if fileio.is_remote(path) else os.fspath(path)
  try:
    with av.open(source) as container:
      if not container.streams.video:
        raise ValueError(f"{path} holds no video stream.")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      rate = stream.average_rate or stream.guessed_rate or stream.base_rate
      size = {}
      if short_side is not None:
        size = dict(zip(("height", "width"), resized_shape(
            (stream.codec_context.height, stream.codec_context.width), short_side)))
        size["interpolation"] = "AREA"
      frames = [frame.to_ndarray(format="rgb24", **size) for frame in container.decode(stream)]
  except (av.FFmpegError, UnicodeDecodeError) as error:
    raise ValueError(f"{path} could not be decoded as a video: {error}") from error
  if not frames:
    raise ValueError(f"{path} holds no decodable frame.")
  return np.stack(frames), float(rate) if rate else 0.0


def resized_shape(shape: tuple[int, int], short_side: int) -> tuple[int, int]:
  """``(height, width)`` scaled so the shorter edge is ``short_side``, aspect ratio kept."""
  height, width = shape
  scale = short_side / min(height, width)
  return max(short_side, round(height * scale)), max(short_side, round(width * scale))


def video_grid(videos: Any, columns: int, padding: int = 1, pad_value: int = 255) -> np.ndarray:
  """Tiles ``[N, T, H, W, 3]`` videos into one ``[T, rows*H + (rows-1)*p, cols*W + (cols-1)*p, 3]``.

  Cells fill row by row; ``padding`` pixels of ``pad_value`` separate neighbouring cells (none at
  the border) so that similar-looking clips stay tellable apart. Unused cells of the last row are
  left at ``pad_value``.
  """
  videos = _as_uint8_video(videos, name="videos", ndim=5)
  if columns < 1:
    raise ValueError(f"columns must be >= 1, got {columns}.")
  count, frames, height, width, channels = videos.shape
  columns = min(columns, count)
  rows = -(-count // columns)
  grid = np.full((frames, rows * height + (rows - 1) * padding,
                  columns * width + (columns - 1) * padding, channels), pad_value, np.uint8)
  for index, video in enumerate(videos):
    row, column = divmod(index, columns)
    top, left = row * (height + padding), column * (width + padding)
    grid[:, top:top + height, left:left + width] = video
  return grid


def write_comparison_grid(path_stem: PathLike, originals: Any, reconstructions: Any,
                          fps: float) -> tuple[epath.Path, epath.Path]:
  """Writes ``<stem>.gif`` and ``<stem>.mp4``: originals on the top row, reconstructions below.

  Each original sits directly above its reconstruction, so artefacts are seen at a glance.
  ``originals`` and ``reconstructions`` are uint8 ``[N, T, H, W, 3]`` of the same shape.
  Returns the two paths written.
  """
  originals = _as_uint8_video(originals, name="originals", ndim=5)
  reconstructions = _as_uint8_video(reconstructions, name="reconstructions", ndim=5)
  if originals.shape != reconstructions.shape:
    raise ValueError(f"originals {originals.shape} and reconstructions "
                     f"{reconstructions.shape} must have the same shape.")
  grid = video_grid(np.concatenate([originals, reconstructions]), columns=len(originals))
  path_stem = epath.Path(path_stem)
  gif_path = write_gif(path_stem.with_name(path_stem.name + ".gif"), grid, fps)
  mp4_path = write_mp4(path_stem.with_name(path_stem.name + ".mp4"), grid, fps)
  return gif_path, mp4_path
