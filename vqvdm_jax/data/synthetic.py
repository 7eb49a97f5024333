"""The embedded default dataset: procedurally generated "moving sprites" videos.

Every clip is one sprite (square, disc, triangle or cross) gliding over a darker background and
bouncing off the walls. It needs no download, so the whole pipeline (VQGAN, diffusion, FVD) runs
out of the box, and it has exactly the structure the model must learn: a class (the shape), a
frame rate and motion that is consistent across frame rates.

The sprite moves at a constant *physical* velocity (pixels per second), so its displacement per
frame is ``velocity / fps``: a 4 fps clip jumps four times as far between frames as a 16 fps one.
That is what makes frame-rate conditioning meaningful.

Clips are rendered on demand from ``(seed, split, index)`` with vectorised numpy (coordinate
grids and masks, no Python loop over pixels or frames), because rendering runs inside the input
pipeline, possibly in grain worker processes (the source is a plain picklable object).

Videos are channel-last: ``[T, H, W, 3]`` uint8.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

SHAPES = ("square", "disc", "triangle", "cross")  # label i is sprite shape SHAPES[i].
SPLITS = ("train", "eval")

# Default sprite side (and disc diameter) relative to the frame size (``config.data.sprite_size``);
# jittered per clip by SIZE_JITTER. Larger sprites make the shapes easier to tell apart at low
# resolution (the demo's 32x32 uses 0.4).
SPRITE_SIZE_FRACTION = 0.25
MAX_SPRITE_SIZE_FRACTION = 0.5  # beyond this a sprite has too little room to move and bounce.
SIZE_JITTER = 0.2
MIN_SPRITE_SIZE = 3.0  # pixels: below this a triangle and a cross stop being recognisable.
# Speed range in frame widths per second; at 4 fps the fastest sprite moves 1/8 of the frame a
# frame, at 16 fps 1/32, so the motion stays trackable at every frame rate in the default config.
SPEED_RANGE = (0.25, 0.5)
# Colours in [0, 1]: every channel of the sprite is brighter than every background pixel
# (background base + gradient <= 0.5 < 0.55), so the sprite is always separable from the
# background, for the model and for tests.
BACKGROUND_RANGE = (0.05, 0.35)
GRADIENT_MAX = 0.15
SPRITE_RANGE = (0.55, 1.0)
# Halfway between the brightest background (BACKGROUND_RANGE[1] + GRADIENT_MAX = 0.5) and the
# darkest sprite channel (0.55): a pixel whose three channels all exceed it is a sprite pixel.
SPRITE_THRESHOLD = (BACKGROUND_RANGE[1] + GRADIENT_MAX + SPRITE_RANGE[0]) / 2.0
CROSS_ARM_FRACTION = 1.0 / 3.0  # half-width of the cross's bars relative to its half-size.


def _split_key(split: str) -> int:
  """A stable integer for the split name (``hash(str)`` is salted per process; crc32 is not)."""
  return zlib.crc32(split.encode("utf-8"))


def sprite_mask(shape: int, dy: np.ndarray, dx: np.ndarray, half_size: float) -> np.ndarray:
  """Boolean mask of a sprite given pixel offsets ``dy, dx`` from its centre.

  ``dy`` and ``dx`` broadcast against each other (e.g. ``[T, H, 1]`` and ``[T, 1, W]``): keeping
  them un-broadcast makes most operations run on a row or column instead of the whole frame.

  Triangles point up (apex at ``dy = -half_size``, base of width ``2 * half_size`` at the bottom);
  the cross is an upright plus sign.
  """
  ady, adx = np.abs(dy), np.abs(dx)
  if shape == 0:  # square
    return (ady <= half_size) & (adx <= half_size)
  if shape == 1:  # disc
    return dy * dy <= half_size * half_size - dx * dx
  if shape == 2:  # triangle
    return (dy <= half_size) & (adx <= (dy + half_size) / 2.0)
  if shape == 3:  # cross
    arm = half_size * CROSS_ARM_FRACTION
    return ((adx <= arm) & (ady <= half_size)) | ((ady <= arm) & (adx <= half_size))
  raise ValueError(f"Unknown sprite shape {shape}; expected 0..{len(SHAPES) - 1} ({SHAPES}).")


def bounce(position: np.ndarray, low: float, high: float) -> np.ndarray:
  """Folds an unbounded straight-line path into ``[low, high]``, as elastic wall bounces do.

  The reflected path is a triangle wave of period ``2 * (high - low)``, so a whole trajectory is
  one vectorised expression instead of a frame-by-frame simulation.
  """
  span = high - low
  if span <= 0:
    return np.full_like(position, (low + high) / 2.0)
  phase = np.mod(position - low, 2.0 * span)
  return low + span - np.abs(phase - span)


class MovingSprites:
  """Random-access source of moving-sprite clips: ``len(source)`` and ``source[index]``.

  ``source[index]`` is ``dict(video=uint8 [T, H, W, 3], label=int32 scalar, fps=float32 scalar)``
  and depends only on ``(seed, split, index)``: the same clip comes back in any process, in any
  order, so grain can shuffle, shard and checkpoint the pipeline freely.

  ``label`` is the sprite's shape (0 square, 1 disc, 2 triangle, 3 cross), cycling with the
  index (``index % num_classes``) so that every split is class-balanced. With
  ``num_classes == 0`` the dataset is unconditional: the label is always 0 and the shape random.
  """

  def __init__(self, num_clips: int, num_frames: int, resolution: int, num_classes: int,
               fps_values: Sequence[float], seed: int, split: str = "train",
               sprite_size: float = SPRITE_SIZE_FRACTION):
    if not 0 <= num_classes <= len(SHAPES):
      raise ValueError(
          f"MovingSprites supports num_classes in 0..{len(SHAPES)} (one class per sprite shape: "
          f"{', '.join(SHAPES)}; 0 = unconditional), got {num_classes}. "
          f"Set --config.data.num_classes to at most {len(SHAPES)}.")
    if split not in SPLITS:
      raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    if not 0 < sprite_size <= MAX_SPRITE_SIZE_FRACTION:
      raise ValueError(
          f"sprite_size is the sprite's side as a fraction of the frame, in (0, "
          f"{MAX_SPRITE_SIZE_FRACTION}], got {sprite_size}. Set --config.data.sprite_size "
          f"accordingly (default {SPRITE_SIZE_FRACTION}).")
    if num_clips < 1 or num_frames < 1 or resolution < 1:
      raise ValueError(f"num_clips, num_frames and resolution must be >= 1, got {num_clips}, "
                       f"{num_frames}, {resolution}.")
    if not fps_values or any(fps <= 0 for fps in fps_values):
      raise ValueError(f"fps_values must be a non-empty sequence of positive frame rates, got "
                       f"{tuple(fps_values)}.")
    self.num_clips = int(num_clips)
    self.num_frames = int(num_frames)
    self.resolution = int(resolution)
    self.num_classes = int(num_classes)
    self.fps_values = tuple(float(fps) for fps in fps_values)
    self.seed = int(seed)
    self.split = split
    self.sprite_size = float(sprite_size)

  def __len__(self) -> int:
    return self.num_clips

  def __repr__(self) -> str:
    return (f"MovingSprites(num_clips={self.num_clips}, num_frames={self.num_frames}, "
            f"resolution={self.resolution}, num_classes={self.num_classes}, "
            f"fps_values={self.fps_values}, seed={self.seed}, split={self.split!r}, "
            f"sprite_size={self.sprite_size})")

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not -self.num_clips <= index < self.num_clips:
      raise IndexError(f"index {index} out of range for {self.num_clips} clips.")
    index %= self.num_clips
    rng = np.random.default_rng([self.seed, _split_key(self.split), index])
    if self.num_classes:
      shape = label = index % self.num_classes
    else:
      shape, label = int(rng.integers(len(SHAPES))), 0
    fps = float(rng.choice(self.fps_values))
    video = self._render(rng, shape, fps)
    return dict(video=video, label=np.int32(label), fps=np.float32(fps))

  def _render(self, rng: np.random.Generator, shape: int, fps: float) -> np.ndarray:
    """Draws the clip's random parameters from ``rng`` and renders it, all frames at once."""
    size, frames = self.resolution, self.num_frames
    jitter = float(rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER))
    sprite_size = max(MIN_SPRITE_SIZE, size * self.sprite_size * jitter)
    half_size = sprite_size / 2.0

    # Trajectory of the centre: a straight line at constant pixels-per-second, folded by walls.
    low, high = half_size, size - half_size
    start = rng.uniform(low, high, size=2)  # (y, x)
    speed = rng.uniform(*SPEED_RANGE) * size  # pixels per second
    angle = rng.uniform(0.0, 2.0 * np.pi)
    velocity = speed * np.array([np.sin(angle), np.cos(angle)])
    seconds = np.arange(frames) / fps
    centre = bounce(start[None, :] + seconds[:, None] * velocity[None, :], low, high)  # [T, 2]

    # Pixel centres sit at integer + 0.5, so a sprite centred at 8.0 is symmetric in a 16 grid.
    coords = np.arange(size, dtype=np.float32) + 0.5
    dy = coords[None, :, None] - centre[:, 0, None, None].astype(np.float32)  # [T, H, 1]
    dx = coords[None, None, :] - centre[:, 1, None, None].astype(np.float32)  # [T, 1, W]
    mask = sprite_mask(shape, dy, dx, half_size)  # [T, H, W]

    # A dark background with a gentle linear gradient in a random direction.
    base = rng.uniform(*BACKGROUND_RANGE, size=3).astype(np.float32)
    gradient_angle = rng.uniform(0.0, 2.0 * np.pi)
    gradient_strength = float(rng.uniform(0.0, GRADIENT_MAX))
    centred = coords - size / 2.0
    projection = (centred[:, None] * np.sin(gradient_angle)
                  + centred[None, :] * np.cos(gradient_angle)) / (size * np.sqrt(2.0)) + 0.5
    background = base + gradient_strength * projection[..., None]  # [H, W, 3], <= 0.5
    colour = rng.uniform(*SPRITE_RANGE, size=3)

    # Quantise once per clip, copy the background into every frame and paint only the sprite's
    # pixels: several times faster than a broadcasting np.where over [T, H, W, 3].
    video = np.empty((frames, size, size, 3), np.uint8)
    video[:] = np.round(background * 255.0).astype(np.uint8)
    video[mask] = np.round(colour * 255.0).astype(np.uint8)
    return video


def make_source(data_config: Any, split: str, seed: int) -> MovingSprites:
  """The random-access source for ``config.data`` and a split ('train' or 'eval').

  ``seed`` is the config's top-level ``config.seed``: one number fixes the whole experiment.
  """
  if data_config.name != "synthetic":
    raise ValueError(
        f"config.data.name={data_config.name!r} is not the embedded dataset; real datasets are "
        f"read through vqvdm_jax.data.pipeline.make_source. For this one, use "
        f"--config.data.name=synthetic.")
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  num_clips = data_config.num_train_clips if split == "train" else data_config.num_eval_clips
  return MovingSprites(num_clips=num_clips, num_frames=data_config.num_frames,
                       resolution=data_config.resolution, num_classes=data_config.num_classes,
                       fps_values=data_config.fps_values, seed=seed, split=split,
                       sprite_size=data_config.sprite_size)
