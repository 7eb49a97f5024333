"""The token priors end to end: `--mode=train` and `--mode=sample` through main on a tokenizer
checkpoint, loading by `vqvdm_jax.load`, resumption after a kill, and the sharded step."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config

from vqvdm_jax import config as config_lib
from vqvdm_jax import main as main_lib
from vqvdm_jax.data import pipeline
from vqvdm_jax.data import tokens as tokens_lib
from vqvdm_jax.inference import model as model_lib
from vqvdm_jax.inference import token_model
from vqvdm_jax.inference.token_model import TokenModel
from vqvdm_jax.training import token_trainer, vqgan_trainer


def _config(stage2: str):
  config = load_config("tiny")
  config.stage2 = stage2
  return config


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """A stage-1 checkpoint at the tiny config's last step: `--mode=train` finds stage 1 done.

  Its weights are untrained (the token priors need codes, not good ones); training stage 1
  would compile the GAN step for a minute of CPU.
  """
  workdir = tmp_path_factory.mktemp("tokenizer")
  config = load_config("tiny")
  trainer = vqgan_trainer.VQGANTrainer(config, workdir, jax.devices()[:1])  # restores onto any
  step = config.vqgan.train.num_steps
  data_iterator = pipeline.train_iterator(config.data, config.vqgan.train.batch_size, config.seed)
  trainer.checkpointer.save(step, trainer.initial_state().replace(step=jnp.asarray(step)),
                            data_iterator, force=True)
  trainer.checkpointer.close()
  return workdir


@pytest.fixture(scope="module", params=["autoregressive", "masked"])
def trained(request, tokenizer_dir, tmp_path_factory):
  """`--mode=train` with config.stage2 = the prior, on a copy of the tokenizer's workdir."""
  stage2 = request.param
  workdir = tmp_path_factory.mktemp(stage2)
  shutil.copytree(tokenizer_dir / "vqgan", workdir / "vqgan")
  config = _config(stage2)
  main_lib.run("train", config, str(workdir))
  return stage2, config, workdir


def _restored_state(config, workdir):
  trainer = token_trainer.TokenTrainer(config, workdir)
  state = trainer.restore()
  trainer.checkpointer.close()
  return jax.device_get(state)


def test_train_mode_trains_the_selected_prior_and_writes_samples(trained):
  stage2, config, workdir = trained
  steps = config.transformer.train.num_steps
  assert (workdir / stage2 / "checkpoints" / str(steps)).exists()
  assert not (workdir / "diffusion" / "checkpoints").exists()  # the other prior is untouched
  cache = tokens_lib.TokenCache(tokens_lib.cache_directory(workdir, 4))
  assert len(cache) == config.data.num_train_clips and cache[0]["codes"].shape == (2, 4, 4)
  assert cache.latents.dtype == np.int32 and cache.meta["source"] == "indices"
  info = json.loads((workdir / "samples" / "000" / "samples.json").read_text())
  assert info["prior"] == stage2 and info["labels"] == [0, 1, 2, 3]
  assert info["guidance_scale"] == config.transformer.sample.guidance_scale
  assert len(list((workdir / "samples" / "000").glob("video_*_class_*.mp4"))) == 4


def test_sample_mode_and_load_use_the_prior_the_workdir_holds(trained):
  stage2, config, workdir = trained
  main_lib.run("sample", config, str(workdir))  # the recorded config names the prior
  with (workdir / "samples" / "001" / "videos.npz").open("rb") as file:
    written = np.load(file)["videos"]
  with (workdir / "samples" / "000" / "videos.npz").open("rb") as file:
    np.testing.assert_array_equal(written, np.load(file)["videos"])  # same seed, same videos
  model = model_lib.load(workdir)
  assert isinstance(model, TokenModel) and model.config.stage2 == stage2
  assert model.step == config.transformer.train.num_steps and model.tokenizer.step == 4


@pytest.mark.parametrize("trained", ["masked"], indirect=True)
def test_continuation_keeps_the_codes_of_the_given_latent_frames(trained):
  _, _, workdir = trained
  model = model_lib.load(workdir)
  cache = tokens_lib.TokenCache(tokens_lib.cache_directory(workdir, 4))
  prompt = np.stack([cache[i]["codes"] for i in range(4)])  # [4, t, h, w]: encoded clips
  # Frame 0 given, frame 1 drawn, frame 2 past the trained two by the sliding window.
  settings = token_model.token_sampling_config(model.config, prompt_frames=1,
                                               num_latent_frames=3)
  codes = next(model.sample_codes(np.arange(4), np.full(4, 8.0, np.float32), 0, settings,
                                  prompt))
  assert codes.shape == (4, 3, 4, 4) and codes.dtype == np.int32
  np.testing.assert_array_equal(codes[:, 0], prompt[:, 0])  # latent frame 0: given
  assert not np.array_equal(codes[:, 1], prompt[:, 1])
  with pytest.raises(ValueError, match="needs prompt codes"):
    next(model.sample_codes(np.arange(4), np.full(4, 8.0, np.float32), 0, settings))


@pytest.mark.parametrize("trained", ["autoregressive"], indirect=True)
def test_resume_after_a_kill_restores_the_same_state(trained, tmp_path):
  """A kill after step 2's checkpoint, then a restart: step 3 equals the uninterrupted run's.

  The autoregressive prior only: the masked one shares every line of the trainer and loop.
  """
  stage2, config, workdir = trained
  uninterrupted = _restored_state(config, workdir)
  shutil.copytree(workdir, tmp_path / "run", ignore=shutil.ignore_patterns("samples"))
  shutil.rmtree(tmp_path / "run" / stage2 / "checkpoints" / "3")  # as if killed after step 2
  resumed = token_trainer.train_prior(config, tmp_path / "run")
  assert int(resumed.step) == 3
  for got, want in zip(jax.tree.leaves(jax.device_get(resumed)),
                       jax.tree.leaves(uninterrupted), strict=True):
    np.testing.assert_array_equal(got, want)


TOKEN_BATCH = {"codes": np.random.default_rng(0).integers(0, 32, (8, 2, 4, 4)).astype(np.int32),
               "label": np.arange(8, dtype=np.int32) % 4, "fps": np.full(8, 8.0, np.float32)}


def _one_step(config, workdir, devices, mesh_shape=(-1, 1), param_sharding="replicated"):
  """One masked-prior step from the initial state on TOKEN_BATCH: (trainer, params, metrics)."""
  config.mesh.shape, config.mesh.param_sharding = mesh_shape, param_sharding
  config.mesh.fsdp_min_size = 0  # the tiny model's arrays are all small: split them anyway
  trainer = token_trainer.TokenTrainer(config, workdir, devices)
  state, metrics = trainer.step(trainer.initial_state(0), TOKEN_BATCH)
  trainer.checkpointer.close()
  return trainer, state.params, jax.device_get(metrics)


@pytest.fixture(scope="module")
def single_device_step(tmp_path_factory):
  """The masked prior's float32 step on one device, without remat: the reference."""
  _, params, metrics = _one_step(_config("masked"), tmp_path_factory.mktemp("single"),
                                 jax.devices()[:1])
  return jax.device_get(params), metrics


def test_fsdp_step_with_remat_equals_single_device_step(single_device_step, tmp_path):
  """Eight devices, batch over data x fsdp (4 x 2), weights and Adam moments split over fsdp,
  blocks rematerialised: the same step as one device."""
  config = _config("masked")
  config.transformer.model.remat = True
  trainer, params, metrics = _one_step(config, tmp_path, jax.devices(), (4, 2), "fsdp")
  kernel = trainer.state_sharding.params["block_0"]["mlp_in"]["kernel"]
  assert "fsdp" in kernel.spec  # parameters really are split...
  assert params["block_0"]["mlp_in"]["kernel"].sharding.spec == kernel.spec  # ... and stay so
  single, single_metrics = single_device_step
  for name in ("loss/tokens", "grad_norm/transformer", "mask/ratio"):
    assert float(metrics[name]) == pytest.approx(float(single_metrics[name]), rel=1e-5)
  # Adam's first update is ~lr * sign(g) (lr = 3e-3): where a gradient is ~0, float noise in it
  # moves the update by a fraction of lr, a wrong or missing gradient by ~lr.
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(jax.device_get(params)), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=3e-4)


def test_bfloat16_fsdp_step_computes_in_bfloat16_and_keeps_float32_weights(single_device_step,
                                                                         tmp_path):
  config = _config("masked")
  config.transformer.model.dtype = "bfloat16"
  _, params, metrics = _one_step(config, tmp_path, jax.devices(), (4, 2), "fsdp")
  loss, reference = float(metrics["loss/tokens"]), float(single_device_step[1]["loss/tokens"])
  assert np.isfinite(loss) and float(metrics["nonfinite/skipped"]) == 0.0
  # bfloat16 keeps 8 bits of mantissa: the loss moves by ~1e-3 relative, not by float32 rounding.
  assert loss == pytest.approx(reference, rel=2e-2) and abs(loss - reference) > 1e-5 * reference
  leaves = jax.tree.leaves(jax.device_get(params))
  assert {leaf.dtype for leaf in leaves} == {np.dtype(np.float32)}
  assert all(np.all(np.isfinite(leaf)) for leaf in leaves)


def test_train_diffusion_mode_with_a_token_prior_says_which_mode_to_use(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="--mode=train_prior"):
    main_lib.run("train_diffusion", _config("masked"), str(tmp_path))


def test_unknown_stage2_is_rejected_with_the_choices():
  config = _config("transformer")
  with pytest.raises(config_lib.ConfigError, match=r"config\.stage2.*'autoregressive'"):
    config_lib.validate(config)


@pytest.mark.parametrize("stage2", ["autoregressive", "masked"])
def test_demo_variants_select_the_prior_and_change_no_model_field(stage2):
  from vqvdm_jax import workdir as workdir_lib
  base, variant = load_config("demo"), load_config("demo", stage2)
  config_lib.validate(variant)
  assert (base.stage2, variant.stage2) == ("diffusion", stage2)
  assert workdir_lib.model_differences(base, variant) == []  # one workdir holds all three


@pytest.mark.parametrize("kind, vocabulary", [("vq", 32), ("ema", 32), ("lfq", 16),
                                              ("fsq", 8 * 5 * 5 * 5)])
def test_every_quantizer_gives_the_transformer_a_plain_vocabulary(kind, vocabulary):
  from vqvdm_jax.priors import model as prior_model
  config = _config("masked")
  config.vqgan.quantizer.kind = kind  # tiny: 4 latent channels, 32 codes
  assert prior_model.vocabulary_size(config) == vocabulary
