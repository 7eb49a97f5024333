"""Grain pipelines: batch layout, exact resume from checkpoints, fixed eval batches, [-1, 1] I/O."""

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vqvdm_jax.data import pipeline, synthetic


def _data_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      name="synthetic", num_frames=8, resolution=16, num_classes=4, fps_values=(4.0, 8.0, 16.0),
      num_train_clips=6, num_eval_clips=5, num_workers=0, prefetch_buffer_size=2,
      sprite_size=0.25))
  config.update(overrides)
  return config


def _assert_batches_equal(expected, actual):
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)


def test_batches_have_expected_shapes_and_dtypes():
  batch = next(pipeline.train_iterator(_data_config(), batch_size=4, seed=0))
  assert set(batch) == {"video", "label", "fps"}
  assert batch["video"].shape == (4, 8, 16, 16, 3) and batch["video"].dtype == np.uint8
  assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
  assert batch["fps"].shape == (4,) and batch["fps"].dtype == np.float32


def test_train_stream_shuffles_and_repeats_with_full_batches():
  # 6 clips in batches of 4: the stream runs on past the first epoch, every batch full.
  iterator = pipeline.train_iterator(_data_config(), batch_size=4, seed=0)
  batches = [next(iterator) for _ in range(3)]  # two epochs' worth of clips.
  assert all(len(batch["label"]) == 4 for batch in batches)
  source = synthetic.make_source(_data_config(), "train", seed=0)
  in_order = [source[i]["video"] for i in range(4)]
  assert not np.array_equal(batches[0]["video"], np.stack(in_order))  # shuffled.
  # Each epoch holds every clip once: the first six clips are a permutation of the source.
  first_epoch = np.concatenate([batches[0]["video"], batches[1]["video"][:2]])
  expected = sorted(source[i]["video"].tobytes() for i in range(6))
  assert sorted(video.tobytes() for video in first_epoch) == expected


def test_train_stream_depends_on_seed():
  first = next(pipeline.train_iterator(_data_config(), batch_size=4, seed=0))
  other = next(pipeline.train_iterator(_data_config(), batch_size=4, seed=1))
  assert not np.array_equal(first["video"], other["video"])


def test_iterator_resumes_exactly_from_saved_state():
  iterator = pipeline.train_iterator(_data_config(), batch_size=2, seed=0)
  for _ in range(2):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]  # crosses the epoch boundary (6 clips).

  resumed = pipeline.train_iterator(_data_config(), batch_size=2, seed=0)
  resumed.set_state(state)
  _assert_batches_equal(expected, [next(resumed) for _ in range(3)])


def test_iterator_resumes_exactly_from_orbax_checkpoint(tmp_path):
  iterator = pipeline.train_iterator(_data_config(), batch_size=2, seed=0)
  for _ in range(3):
    next(iterator)
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = [next(iterator) for _ in range(2)]

  resumed = pipeline.train_iterator(_data_config(), batch_size=2, seed=0)
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.restore(manager.latest_step(),
                    args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_batches_equal(expected, [next(resumed) for _ in range(2)])


def test_batch_size_must_divide_over_processes(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert pipeline.per_process_batch_size(8) == 4
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.per_process_batch_size(5)


def test_eval_batches_are_fixed_in_order_and_keep_partial_last_batch():
  config = _data_config()
  batches = list(pipeline.eval_batches(config, batch_size=2, num_clips=5, seed=0))
  assert [len(batch["label"]) for batch in batches] == [2, 2, 1]
  source = synthetic.make_source(config, "eval", seed=0)
  videos = np.concatenate([batch["video"] for batch in batches])
  np.testing.assert_array_equal(videos, np.stack([source[i]["video"] for i in range(5)]))
  again = list(pipeline.eval_batches(config, batch_size=2, num_clips=5, seed=0))
  _assert_batches_equal(batches, again)


def test_eval_batches_reject_more_clips_than_the_split_has():
  with pytest.raises(ValueError, match="num_eval_clips"):
    pipeline.eval_batches(_data_config(), batch_size=2, num_clips=6, seed=0)


def test_uint8_roundtrip_of_model_input():
  video = np.arange(256, dtype=np.uint8).reshape(1, 4, 8, 8, 1)
  model_input = pipeline.to_model_input(video)
  assert model_input.dtype == np.float32
  assert model_input.min() == -1.0 and model_input.max() == 1.0
  np.testing.assert_array_equal(pipeline.to_uint8(model_input), video)
  # Inside jit, on jax arrays, with out-of-range decoder outputs clipped rather than wrapped.
  roundtrip = jax.jit(lambda v: pipeline.to_uint8(pipeline.to_model_input(v)))(jnp.asarray(video))
  np.testing.assert_array_equal(np.asarray(roundtrip), video)
  overshoot = pipeline.to_uint8(np.array([-1.5, -1.0, 0.0, 1.0, 1.5], np.float32))
  np.testing.assert_array_equal(overshoot, [0, 0, 128, 255, 255])
