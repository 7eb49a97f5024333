"""GIF/MP4 writing and video grids."""

import os

import imageio.v3 as imageio_v3
import numpy as np
import pytest

from vqvdm_jax import video_io


def _video(frames=8, height=16, width=16, seed=0):
  # Distinct frames: Pillow merges identical consecutive GIF frames, which would hide a bug.
  return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def _mp4_frames(path):
  frames, _ = video_io.read_video(path)
  return frames


@pytest.mark.parametrize("size", [16, 32])
def test_gif_and_mp4_round_trip_frame_count(tmp_path, size):
  video = _video(height=size, width=size)
  gif = video_io.write_gif(tmp_path / "nested" / "clip.gif", video, fps=8)
  mp4 = video_io.write_mp4(tmp_path / "nested" / "clip.mp4", video, fps=8)
  gif_frames = imageio_v3.imread(os.fspath(gif), index=None)  # imageio wants str, not epath
  assert gif_frames.shape[:3] == (8, size, size)
  mp4_frames = _mp4_frames(mp4)
  assert mp4_frames.shape == (8, size, size, 3)  # not resized to a macro-block multiple.
  assert video_io.read_video(mp4)[1] == pytest.approx(8.0)


def test_gif_keeps_the_frame_rate(tmp_path):
  gif = video_io.write_gif(tmp_path / "clip.gif", _video(), fps=4)
  assert imageio_v3.immeta(os.fspath(gif), index=0)["duration"] == pytest.approx(250)  # milliseconds.


def test_mp4_content_survives_compression(tmp_path):
  # A smooth video (H.264 is lossy on noise): frames come back close to what was written.
  ramp = np.linspace(0, 255, 16, dtype=np.float32)
  frame = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128.0), axis=-1)
  video = np.stack([np.roll(frame, shift, axis=1) for shift in range(8)]).astype(np.uint8)
  frames = _mp4_frames(video_io.write_mp4(tmp_path / "smooth.mp4", video, fps=8))
  assert np.abs(frames.astype(np.float32) - video).mean() < 12.0


def test_mp4_pads_odd_frame_sizes(tmp_path):
  frames = _mp4_frames(video_io.write_mp4(tmp_path / "odd.mp4", _video(height=15, width=17), 8))
  assert frames.shape == (8, 16, 18, 3)


def test_writers_reject_float_videos(tmp_path):
  with pytest.raises(TypeError, match="to_uint8"):
    video_io.write_gif(tmp_path / "clip.gif", np.zeros((8, 16, 16, 3), np.float32), fps=8)
  with pytest.raises(TypeError, match="uint8"):
    video_io.video_grid(np.zeros((2, 8, 16, 16, 3), np.float32), columns=2)


def test_video_grid_places_videos_row_by_row_with_separators():
  videos = np.stack([np.full((2, 4, 5, 3), value, np.uint8) for value in (10, 20, 30)])
  grid = video_io.video_grid(videos, columns=2, padding=1, pad_value=255)
  assert grid.shape == (2, 4 + 1 + 4, 5 + 1 + 5, 3)
  assert (grid[:, :4, :5] == 10).all() and (grid[:, :4, 6:] == 20).all()
  assert (grid[:, 5:, :5] == 30).all()
  assert (grid[:, 4] == 255).all() and (grid[:, :, 5] == 255).all()  # separators.
  assert (grid[:, 5:, 6:] == 255).all()  # the empty last cell.


def test_comparison_grid_puts_originals_above_reconstructions(tmp_path):
  originals = np.stack([_video(seed=1), _video(seed=2)])
  reconstructions = np.stack([_video(seed=3), _video(seed=4)])
  gif, mp4 = video_io.write_comparison_grid(tmp_path / "eval" / "step_10", originals,
                                            reconstructions, fps=8)
  assert gif.name == "step_10.gif" and mp4.name == "step_10.mp4"
  assert gif.exists() and mp4.exists()
  expected = video_io.video_grid(np.concatenate([originals, reconstructions]), columns=2)
  assert expected.shape == (8, 33, 33, 3)
  np.testing.assert_array_equal(expected[:, 17:, :16], reconstructions[0])  # below originals[0].
  np.testing.assert_array_equal(expected[:, :16, 17:], originals[1])
  assert imageio_v3.imread(os.fspath(gif), index=None).shape[:3] == (8, 33, 33)
  assert _mp4_frames(mp4).shape == (8, 34, 34, 3)  # odd grid padded for H.264.


def test_comparison_grid_rejects_mismatched_shapes(tmp_path):
  with pytest.raises(ValueError, match="same shape"):
    video_io.write_comparison_grid(tmp_path / "x", np.stack([_video()]),
                                   np.stack([_video(frames=4)]), fps=8)


def test_mp4_keeps_an_ntsc_frame_rate(tmp_path):
  mp4 = video_io.write_mp4(tmp_path / "ntsc.mp4", _video(), fps=30000 / 1001)
  assert video_io.read_video(mp4)[1] == pytest.approx(29.97, abs=1e-2)


@pytest.mark.parametrize("content", [b"", b"\x00\x01not a video at all" * 64])
def test_read_video_names_a_file_that_is_not_a_video(tmp_path, content):
  path = tmp_path / "broken.mp4"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="broken.mp4"):
    video_io.read_video(path)


def test_read_video_rejects_a_truncated_file(tmp_path):
  mp4 = video_io.write_mp4(tmp_path / "whole.mp4", _video(), fps=8)
  truncated = tmp_path / "truncated.mp4"
  truncated.write_bytes(mp4.read_bytes()[:200])
  with pytest.raises(ValueError, match="truncated.mp4"):
    video_io.read_video(truncated)
