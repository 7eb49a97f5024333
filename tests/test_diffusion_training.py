"""Stage 2: latent cache, guidance training, loss decrease, sampling and the whole pipeline."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compile_for_many_steps, load_config

from vqvdm_jax import main as main_lib
from vqvdm_jax import sharding
from vqvdm_jax.data import latents as latents_lib
from vqvdm_jax.inference import model as model_lib
from vqvdm_jax.inference import sampling
from vqvdm_jax.inference.tokenizer import load_tokenizer
from vqvdm_jax.row_random import video_keys
from vqvdm_jax.training import diffusion_trainer


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
  """The tiny config through `--mode=train`: stage 1, stage 2 and samples."""
  workdir = tmp_path_factory.mktemp("pipeline")
  config = load_config("tiny")
  main_lib.run("train", config, str(workdir))
  return config, workdir


def test_train_mode_runs_both_stages_and_writes_samples(pipeline_run):
  config, workdir = pipeline_run
  assert (workdir / "vqgan" / "checkpoints" / "4").exists()
  assert (workdir / "diffusion" / "checkpoints" / "4").exists()
  samples = workdir / "samples" / "000"  # the first invocation's folder
  info = json.loads((samples / "samples.json").read_text())
  assert info["num_videos"] == config.diffusion.sample.num_videos
  assert info["labels"] == [0, 1, 2, 3]  # label -1 cycles through the classes
  assert len(list(samples.glob("video_*_class_*.mp4"))) == config.diffusion.sample.num_videos
  assert (samples / "grid.gif").exists()


def test_latent_cache_is_built_once_and_stage2_keeps_the_scale_factor(pipeline_run):
  config, workdir = pipeline_run
  cache = latents_lib.LatentCache(latents_lib.cache_directory(workdir, 4))
  assert len(cache) == config.data.num_train_clips
  assert cache.latent_shape == (2, 4, 4, 4)
  assert "scale_factor" not in cache.meta  # one place holds it: the stage-2 checkpoint
  expected = 1.0 / np.std(np.asarray(cache.latents[:config.diffusion.latents.scale_estimate_clips],
                                     np.float64))
  tokenizer = load_tokenizer(workdir)

  def must_not_encode(video):
    raise AssertionError("the cache exists; nothing should be re-encoded")

  reused = latents_lib.build_or_load(config, workdir, tokenizer.step, must_not_encode)
  np.testing.assert_array_equal(reused.latents, cache.latents)
  trainer = diffusion_trainer.DiffusionTrainer(config, workdir, cache.latent_shape)
  state = trainer.restore()
  trainer.checkpointer.close()
  assert float(state.scale_factor) == pytest.approx(expected, rel=1e-5)
  np.testing.assert_array_equal(np.asarray(state.latent_shift), 0.0)  # center=False
  assert int(state.tokenizer_step) == 4


@pytest.mark.parametrize("center", [False, True])
def test_latent_normalization_gives_unit_variance_and_round_trips(center):
  rng = np.random.default_rng(0)
  latents = (rng.standard_normal((64, 2, 4, 4, 3)) * [0.5, 2.0, 1.0] + [-3.0, 1.0, 0.5])
  shift, scale = latents_lib.normalization(latents, center)
  z = np.asarray(latents_lib.to_model_space(latents.astype(np.float32), shift, scale))
  assert z.std() == pytest.approx(1.0, rel=1e-4)
  if center:
    np.testing.assert_allclose(z.reshape(-1, 3).mean(axis=0), 0.0, atol=1e-4)
  else:
    np.testing.assert_array_equal(shift, 0.0)
    assert scale == pytest.approx(latents_lib.scale_factor(latents))
  np.testing.assert_allclose(latents_lib.from_model_space(z, shift, scale), latents, rtol=1e-4,
                             atol=1e-4)


def test_rerunning_train_mode_with_more_steps_resumes_both_stages(pipeline_run, tmp_path,
                                                                  monkeypatch):
  """A finished run asked for one more stage-2 step: stage 1 is not retrained, the latents are
  not re-encoded, stage 2 continues from its checkpoint (never from a fresh state)."""
  config, workdir = pipeline_run
  import shutil
  shutil.copytree(workdir, tmp_path / "run", symlinks=True)
  workdir = tmp_path / "run"
  vqgan_checkpoint = workdir / "vqgan" / "checkpoints" / "4"
  cache_meta = latents_lib.cache_directory(workdir, 4) / "meta.json"
  before = os.stat(vqgan_checkpoint).st_mtime_ns, os.stat(cache_meta).st_mtime_ns

  def must_not_start_fresh(*args, **kwargs):
    raise AssertionError("a checkpoint exists; training must resume from it")

  monkeypatch.setattr(diffusion_trainer.DiffusionTrainer, "initial_state", must_not_start_fresh)
  config = load_config("tiny")
  config.diffusion.train.num_steps = 5
  main_lib.run("train", config, str(workdir))
  assert sorted(p.name for p in (workdir / "vqgan" / "checkpoints").iterdir()
                if p.name.isdigit()) == ["2", "4"]
  assert (os.stat(vqgan_checkpoint).st_mtime_ns, os.stat(cache_meta).st_mtime_ns) == before
  assert (workdir / "diffusion" / "checkpoints" / "5").exists()
  assert json.loads((workdir / "samples" / "001" / "samples.json").read_text())["step"] == 5


def test_null_label_is_used_at_rate_rho():
  labels = jnp.zeros((20_000,), jnp.int32)
  for rate in (0.0, 0.5, 1.0):
    dropped = diffusion_trainer.drop_labels(labels, rate, 7, jax.random.PRNGKey(0))
    assert set(np.unique(np.asarray(dropped))) <= {0, 7}
    assert float(jnp.mean(dropped == 7)) == pytest.approx(rate, abs=0.015)


def _tiny_trainer(tmp_path, devices, learning_rate=None, **overrides):
  config = load_config("tiny")
  for key, value in overrides.items():
    config.diffusion.train[key] = value
  if learning_rate is not None:
    config.diffusion.optim.learning_rate = learning_rate
  trainer = diffusion_trainer.DiffusionTrainer(config, tmp_path, (2, 4, 4, 4), devices=devices)
  return config, trainer


@pytest.mark.learning
def test_tiny_stage2_run_lowers_its_loss_and_keeps_an_ema_of_the_weights(tmp_path):
  """Measured mean(last 20) / mean(first 5): 0.463 (XLA:CPU default and AVX), 0.474 (SSE4_2)."""
  config, trainer = _tiny_trainer(tmp_path, jax.devices()[:1], learning_rate=3e-3)
  # One latent per class: a learnable target whose ε is fully determined by z_t and t.
  pattern = np.random.default_rng(0).normal(size=(4, 2, 4, 4, 4)).astype(np.float32)
  latents = 0.1 * pattern[np.arange(8) % 4]
  batch = {"latent": latents, "label": np.arange(8, dtype=np.int32) % 4,
           "fps": np.full(8, 8.0, np.float32)}
  state = trainer.initial_state(2.0, 0)
  trainer.train_step = compile_for_many_steps(trainer.train_step, state,
                                              sharding.shard_batch(batch, trainer.mesh))
  losses = []
  for step in range(150):
    previous = jax.device_get((state.params, state.ema_params)) if step < 2 else None
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss/diffusion"]))
    if previous is not None:  # EMA of the weights: ema <- d * ema + (1 - d) * params
      decay = config.diffusion.optim.ema_decay
      expected = jax.tree.map(lambda ema, new: decay * ema + (1 - decay) * new, previous[1],
                              jax.device_get(state.params))
      for got, want in zip(jax.tree.leaves(jax.device_get(state.ema_params)),
                           jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
      assert not all(np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(previous[0]), jax.tree.leaves(jax.device_get(state.params))))
  trainer.checkpointer.close()
  assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:5]), (losses[:5], losses[-20:])


def test_train_step_sees_latents_through_the_states_shift_and_scale(tmp_path):
  # Every device, as pipeline_run's `--mode=train`: its compiled init and step are this test's,
  # from the compilation cache.
  _, trainer = _tiny_trainer(tmp_path, jax.devices())
  base = np.random.default_rng(1).normal(size=(8, 2, 4, 4, 4)).astype(np.float32)
  shift = np.array([-2.0, 0.5, 1.0, 3.0], np.float32)
  batch = {"label": np.arange(8, dtype=np.int32) % 4, "fps": np.full(8, 8.0, np.float32)}
  _, plain = trainer.step(trainer.initial_state(2.0, 0), {**batch, "latent": base / 2.0})
  _, shifted = trainer.step(trainer.initial_state(2.0, 0, shift),
                            {**batch, "latent": base / 2.0 + shift})
  _, unshifted = trainer.step(trainer.initial_state(2.0, 0),
                              {**batch, "latent": base / 2.0 + shift})
  trainer.checkpointer.close()
  # (base / 2 + shift - shift) * 2 = base / 2 * 2: the model saw the same z_0 either way.
  assert float(shifted["loss/diffusion"]) == pytest.approx(float(plain["loss/diffusion"]),
                                                           rel=1e-5)
  assert float(unshifted["loss/diffusion"]) != pytest.approx(float(plain["loss/diffusion"]),
                                                             rel=1e-2)


def test_centered_stage2_stores_the_channel_mean_of_its_latents(pipeline_run, tmp_path):
  config, workdir = pipeline_run
  config = load_config("tiny")
  config.diffusion.latents.center = True
  config.diffusion.train.num_steps = 1
  (tmp_path / "diffusion").mkdir()
  (tmp_path / "vqgan").symlink_to(workdir / "vqgan")
  (tmp_path / "diffusion" / "latents").symlink_to(workdir / "diffusion" / "latents")
  state = diffusion_trainer.train_diffusion(config, tmp_path)
  cache = latents_lib.LatentCache(latents_lib.cache_directory(workdir, 4))
  clips = np.asarray(cache.latents[:config.diffusion.latents.scale_estimate_clips], np.float64)
  mean = clips.reshape(-1, clips.shape[-1]).mean(axis=0)
  assert np.abs(mean).max() > 1e-3  # otherwise centring would be invisible
  np.testing.assert_allclose(np.asarray(state.latent_shift), mean, rtol=1e-4, atol=1e-6)
  assert float(state.scale_factor) == pytest.approx(1.0 / np.std(clips - mean), rel=1e-5)


def test_sampling_is_deterministic_for_a_seed_and_depends_on_it(tmp_path):
  config, trainer = _tiny_trainer(tmp_path, jax.devices()[:1])
  state = trainer.initial_state(1.0, 0)
  trainer.checkpointer.close()
  sample_fn = jax.jit(sampling.make_sample_fn(config, trainer.unet, trainer.schedule,
                                              (2, 4, 4, 4)))
  labels, fps = jnp.arange(4) % 4, jnp.full((4,), 8.0)
  first = np.asarray(sample_fn(state.ema_params, labels, fps, video_keys(1, 0, 4)))
  again = np.asarray(sample_fn(state.ema_params, labels, fps, video_keys(1, 0, 4)))
  other = np.asarray(sample_fn(state.ema_params, labels, fps, video_keys(2, 0, 4)))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)


def test_a_seed_gives_the_same_videos_whatever_the_devices_padding_or_batch_size(pipeline_run):
  """4 videos on 1 device (one batch of 4), on 8 devices (one batch padded to 8) and in batches
  of 2 are the same videos: video i draws all its noise from its own key fold_in(seed, i)."""
  config, workdir = pipeline_run
  assert config.diffusion.sample.batch_size == 4
  single = model_lib.load(workdir, devices=jax.devices()[:1])
  sharded = model_lib.load(workdir, devices=jax.devices()[:8])
  assert sharded.mesh.size == 8 and sampling.padded_batch_size(4, sharded.mesh) == 8
  request = {"labels": [0, 1, 2, 3], "fps": 8.0, "seed": 5}
  reference = single.sample(**request)
  assert reference.shape == (4, 8, 16, 16, 3) and reference.dtype == np.uint8
  for videos in (sharded.sample(**request), single.sample(**request, batch_size=2)):
    # uint8 after decoding: allow a rounding step where float sums differ in the last bit.
    assert np.abs(videos.astype(int) - reference.astype(int)).max() <= 1


def test_sample_mode_without_stage2_checkpoint_says_how_to_train(pipeline_run, tmp_path):
  config, workdir = pipeline_run
  import shutil
  shutil.copytree(workdir / "vqgan", tmp_path / "vqgan")
  shutil.copy(workdir / "config.json", tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="has no stage-2 checkpoint.*--mode=train_diffusion"):
    model_lib.load(tmp_path)


def test_sample_every_writes_progress_samples_during_stage2(pipeline_run, tmp_path):
  config, workdir = pipeline_run
  import shutil
  shutil.copytree(workdir / "vqgan", tmp_path / "vqgan")
  config = load_config("tiny")
  config.diffusion.train.num_steps = 3
  config.diffusion.train.sample_every = 2
  diffusion_trainer.train_diffusion(config, tmp_path)
  progress = tmp_path / "diffusion" / "progress"
  assert sorted(path.name for path in progress.iterdir()) == ["step_0000002"]  # not the last
  info = json.loads((progress / "step_0000002" / "samples.json").read_text())
  assert info["step"] == 2 and (progress / "step_0000002" / "grid.gif").exists()
