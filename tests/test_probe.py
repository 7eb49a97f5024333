"""The frame-classifier probe used to score class-conditional samples."""

import numpy as np
import pytest

from vqvdm_jax.data.synthetic import MovingSprites
from vqvdm_jax.evaluation import probe


def sprite_clips(split: str, num_clips: int):
  source = MovingSprites(num_clips, num_frames=2, resolution=32, num_classes=4,
                         fps_values=(8.0,), seed=0, split=split, sprite_size=0.4)
  items = [source[i] for i in range(num_clips)]
  return np.stack([item["video"] for item in items]), np.array([item["label"] for item in items])


@pytest.mark.learning
def test_probe_learns_sprite_shapes_and_fails_on_shuffled_labels():
  """Held-out accuracy measured 0.69-0.72 (shuffled labels: 0.27-0.28) under XLA:CPU's default,
  AVX and SSE4_2 code; 128 held-out clips keep the estimate's noise near ±0.04."""
  videos, labels = sprite_clips("train", 128)
  held_out, held_out_labels = sprite_clips("eval", 128)
  params = probe.train_frame_classifier(videos, labels, 4, num_steps=300, batch_size=64)
  accuracy = (probe.predict_clip_labels(params, held_out, 4) == held_out_labels).mean()
  assert accuracy > 0.5, accuracy  # chance is 0.25
  # Labels unrelated to the shape cannot be learned: the probe reads the sprite, not the index.
  shuffled = np.random.default_rng(0).permutation(labels)
  params = probe.train_frame_classifier(videos, shuffled, 4, num_steps=300, batch_size=64)
  accuracy = (probe.predict_clip_labels(params, held_out, 4) == held_out_labels).mean()
  assert accuracy < 0.42, accuracy


def test_per_class_accuracy():
  predicted = np.array([0, 0, 1, 2, 2, 2])
  labels = np.array([0, 1, 1, 2, 2, 0])
  np.testing.assert_allclose(probe.per_class_accuracy(predicted, labels, 4),
                             [0.5, 0.5, 1.0, np.nan])


def test_bad_labels_are_a_clear_error():
  videos = np.zeros((2, 2, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
    probe.train_frame_classifier(videos, np.array([0, 4]), 4, num_steps=1)
  with pytest.raises(ValueError, match="Expected videos"):
    probe.train_frame_classifier(videos, np.array([0]), 4, num_steps=1)


def test_foreground_visible_tells_sprites_from_empty_backgrounds():
  videos, _ = sprite_clips("eval", 8)
  assert probe.foreground_visible(videos).all()
  backgrounds = np.repeat(np.median(videos, axis=(2, 3), keepdims=True), 32, 2).repeat(32, 3)
  assert not probe.foreground_visible(backgrounds.astype(np.uint8)).any()
  # Visible in one frame of two counts (half the frames); in none does not.
  mixed = videos.copy()
  mixed[:, 1] = backgrounds[:, 1]
  assert probe.foreground_visible(mixed).all()
  mixed[:, 0] = backgrounds[:, 0]
  assert not probe.foreground_visible(mixed).any()


def test_class_scores_count_correct_and_visible_clips_per_class(monkeypatch):
  videos, _ = sprite_clips("eval", 4)
  backgrounds = np.repeat(np.median(videos, axis=(2, 3), keepdims=True), 32, 2).repeat(32, 3)
  videos[3] = backgrounds[3]  # clip 3 shows no sprite
  expected = np.array([0, 1, 1, 2])
  monkeypatch.setattr(probe, "predict_clip_labels", lambda params, clips, n: np.array([0, 1, 0, 2]))
  scores = probe.class_scores(None, videos.astype(np.uint8), expected, 4)
  assert scores["accuracy"] == 0.75 and scores["visible"] == 0.75
  assert scores["correct_and_visible"] == 0.5  # clip 3 is labelled right but empty
  np.testing.assert_allclose(scores["per_class_accuracy"], [1.0, 0.5, 1.0, np.nan])
  np.testing.assert_allclose(scores["per_class_visible"], [1.0, 1.0, 0.0, np.nan])
