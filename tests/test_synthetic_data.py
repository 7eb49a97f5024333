"""The moving-sprites dataset: determinism, classes, frame-rate-consistent motion, picklability."""

import pickle

import ml_collections
import numpy as np
import pytest

from vqvdm_jax.data import synthetic

SPRITE_THRESHOLD = 135  # every sprite channel is >= 140, every background channel <= 128.


def _source(**overrides):
  kwargs = dict(num_clips=8, num_frames=8, resolution=16, num_classes=4,
                fps_values=(4.0, 8.0, 16.0), seed=0, split="train")
  kwargs.update(overrides)
  return synthetic.MovingSprites(**kwargs)


def _sprite_mask(frame):
  return frame.min(axis=-1) >= SPRITE_THRESHOLD


def _crop(mask):
  ys, xs = np.nonzero(mask)
  return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def test_clip_has_expected_shapes_and_dtypes():
  clip = _source()[3]
  assert clip["video"].shape == (8, 16, 16, 3) and clip["video"].dtype == np.uint8
  assert clip["label"].dtype == np.int32 and clip["label"].shape == ()
  assert clip["fps"].dtype == np.float32 and float(clip["fps"]) in (4.0, 8.0, 16.0)


def test_clip_is_deterministic_for_index_and_seed():
  first, again = _source()[5], _source()[5]
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  assert not np.array_equal(first["video"], _source()[6]["video"])
  assert not np.array_equal(first["video"], _source(seed=1)[5]["video"])


def test_train_and_eval_splits_differ():
  train, held_out = _source(split="train"), _source(split="eval")
  for index in range(4):
    assert not np.array_equal(train[index]["video"], held_out[index]["video"])


def test_labels_match_sprite_shape_classes():
  source = _source(num_clips=8, resolution=32)  # sprites of 6-10 px: shapes are recognisable.
  for index in range(len(source)):
    clip = source[index]
    sprite = _crop(_sprite_mask(clip["video"][0]))
    height, width = sprite.shape
    fill = sprite.mean()
    label = int(clip["label"])
    assert label == index % 4  # classes cycle with the index: balanced splits.
    if label == 0:  # square: fills its bounding box.
      assert fill == 1.0
    elif label == 1:  # disc: ~pi/4 of its box, corners empty, rows widest in the middle.
      assert 0.65 < fill < 0.95
      assert not (sprite[0, 0] or sprite[0, -1] or sprite[-1, 0] or sprite[-1, -1])
      assert sprite[height // 2].sum() > max(sprite[0].sum(), sprite[-1].sum())
    elif label == 2:  # triangle pointing up: narrow top row, full bottom row, top corners empty.
      assert sprite[0].sum() < sprite[-1].sum() == width
      assert not (sprite[0, 0] or sprite[0, -1])
    else:  # cross: full middle row and column, empty corners, about half its box.
      assert not (sprite[0, 0] or sprite[0, -1] or sprite[-1, 0] or sprite[-1, -1])
      assert sprite[height // 2].all() and sprite[:, width // 2].all()
      assert 0.35 < fill < 0.7


def test_unconditional_dataset_has_label_zero_and_mixed_shapes():
  source = _source(num_clips=16, num_classes=0, resolution=32)
  fills = set()
  for index in range(len(source)):
    clip = source[index]
    assert int(clip["label"]) == 0
    fills.add(round(float(_crop(_sprite_mask(clip["video"][0])).mean()), 2))
  assert len(fills) > 1  # not every clip draws the same shape.


@pytest.mark.parametrize("num_classes", [-1, 5])
def test_unsupported_num_classes_is_rejected(num_classes):
  with pytest.raises(ValueError, match="num_classes"):
    _source(num_classes=num_classes)


def _mean_step(source):
  """Mean per-frame displacement of the sprite's centroid, in pixels, over the whole source."""
  steps = []
  for index in range(len(source)):
    video = source[index]["video"]
    centroids = np.array([np.argwhere(_sprite_mask(frame)).mean(axis=0) for frame in video])
    steps.append(np.linalg.norm(np.diff(centroids, axis=0), axis=-1).mean())
  return float(np.mean(steps))


def test_higher_fps_means_smaller_per_frame_motion():
  slow = _mean_step(_source(num_clips=8, resolution=32, fps_values=(4.0,)))
  fast = _mean_step(_source(num_clips=8, resolution=32, fps_values=(16.0,)))
  # Same physical speeds (pixels per second): a quarter of the frame interval, ~a quarter of the
  # displacement. Bounces and pixel quantisation blur the ratio a little, hence the tolerance.
  assert 2.5 < slow / fast < 6.0, (slow, fast)
  assert slow * 4.0 == pytest.approx(fast * 16.0, rel=0.5)  # pixels per second agree.


def test_bounce_keeps_path_inside_walls_and_reflects_speed():
  path = np.linspace(-30.0, 50.0, 801)  # a straight line crossing both walls several times.
  folded = synthetic.bounce(path, 2.0, 14.0)
  assert folded.min() >= 2.0 and folded.max() <= 14.0
  assert folded.min() == pytest.approx(2.0) and folded.max() == pytest.approx(14.0)
  # Elastic walls: the speed never changes, only the direction.
  np.testing.assert_allclose(np.abs(np.diff(folded)), 0.1, atol=1e-9, rtol=0, err_msg="speed")
  np.testing.assert_allclose(synthetic.bounce(np.array([5.0, 15.0, 0.0]), 2.0, 14.0),
                             [5.0, 13.0, 4.0])


def test_sprite_never_leaves_the_frame():
  # 16 frames at 4 fps: four seconds, enough for most sprites to reach a wall.
  source = _source(num_clips=8, num_frames=16, resolution=32, num_classes=1, fps_values=(4.0,))
  for index in range(len(source)):
    video = source[index]["video"]
    sizes = np.array([_crop(_sprite_mask(frame)).shape for frame in video])
    # A square cut off by a wall would shrink; sub-pixel placement changes its side by <= 1 px.
    assert sizes.max() - sizes.min() <= 1, sizes


def test_source_pickles_for_grain_workers():
  source = _source()
  restored = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(restored[2]["video"], source[2]["video"])


def test_index_out_of_range_raises_index_error():
  with pytest.raises(IndexError):
    _source(num_clips=4)[4]


def _data_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      name="synthetic", num_frames=8, resolution=16, num_classes=4, fps_values=(4.0, 8.0),
      num_train_clips=12, num_eval_clips=5, num_workers=0, prefetch_buffer_size=2,
      sprite_size=synthetic.SPRITE_SIZE_FRACTION))
  config.update(overrides)
  return config


def test_make_source_uses_split_sizes_from_config():
  assert len(synthetic.make_source(_data_config(), "train", seed=0)) == 12
  assert len(synthetic.make_source(_data_config(), "eval", seed=0)) == 5


def test_make_source_rejects_unprepared_datasets_with_the_fix():
  with pytest.raises(ValueError, match="--config.data.name=synthetic"):
    synthetic.make_source(_data_config(name="ucf101"), "train", seed=0)


def test_sprite_size_sets_the_sprite_area():
  def mean_area(sprite_size):
    config = _data_config(resolution=32, sprite_size=sprite_size)
    source = synthetic.make_source(config, "train", seed=0)
    return np.mean([_sprite_mask(source[i]["video"][0]).sum() for i in range(8)])

  small, large = mean_area(0.25), mean_area(0.5)
  assert 3.0 < large / small < 5.0  # area grows with the side squared: (0.5 / 0.25)^2 = 4


@pytest.mark.parametrize("sprite_size", [0.0, -0.1, 0.6])
def test_out_of_range_sprite_size_is_rejected_with_the_fix(sprite_size):
  with pytest.raises(ValueError, match="--config.data.sprite_size"):
    _source(sprite_size=sprite_size)
