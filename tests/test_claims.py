"""What the README promises about runs and trained models, checked directly.

Non-finite gradients are skipped even when the loss is finite, and the skips reach TensorBoard;
a stage past its time budget stops early and stays stopped; evaluation and sampling load the EMA
weights; only process 0 writes summaries and videos.
"""

import copy
import json
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load_config, stage1_options_config

import vqvdm_jax
from vqvdm_jax import checkpointing, losses
from vqvdm_jax import workdir as workdir_lib
from vqvdm_jax.data import pipeline
from vqvdm_jax.inference import sampling
from vqvdm_jax.inference.tokenizer import Tokenizer, init_variables
from vqvdm_jax.models.vqgan import latent_shape, make_vqgan
from vqvdm_jax.row_random import video_keys
from vqvdm_jax.training import diffusion_trainer, loop, reporting, vqgan_trainer

LATENT_SHAPE = (2, 4, 4, 4)


@pytest.fixture(scope="module")
def stage2_trainer(tmp_path_factory):
  """The tiny stage-2 trainer on one device (the step test_preemption compiles too)."""
  trainer = diffusion_trainer.DiffusionTrainer(
      load_config("tiny"), tmp_path_factory.mktemp("stage2"), LATENT_SHAPE,
      devices=jax.devices()[:1])
  trainer.checkpointer.close()  # unused: the tests step by hand or give the loop their own
  return trainer


def _batch(index, nan=False):
  latent = np.random.default_rng(index).normal(size=(8, *LATENT_SHAPE)).astype(np.float32)
  if nan:
    latent[0, 0, 0, 0, 0] = np.nan
  return {"latent": latent, "label": np.arange(8, dtype=np.int32) % 4,
          "fps": np.full(8, 8.0, np.float32)}


def _host(tree):
  return [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(tree))]


def _with_infinite_output_kernel_gradient(params):
  """Weights whose loss is finite and whose output-conv kernel gradient is +-inf.

  The output GroupNorm emits its bias, 1e36, everywhere; the output conv's kernel is 0, so the
  prediction is its bias, 1000: a loss near 1e6. The kernel's gradient sums 1e36 x ~2000 over
  the positions, past float32's 3.4e38; every other gradient passes through the 0 kernel as 0.
  """
  params = jax.tree.map(np.array, jax.device_get(params))
  params["output_norm"]["GroupNorm_0"]["scale"][:] = 0.0
  params["output_norm"]["GroupNorm_0"]["bias"][:] = 1e36
  params["output_conv"]["kernel"][:] = 0.0
  params["output_conv"]["bias"][:] = 1e3
  return params


def test_a_nonfinite_gradient_with_a_finite_loss_skips_the_update(stage2_trainer):
  trainer = stage2_trainer
  state, metrics = trainer.step(trainer.initial_state(1.0, 0), _batch(0))
  assert float(metrics["nonfinite/skipped"]) == 0.0  # Adam's moments and the EMA have moved
  state = state.replace(params=jax.device_put(
      _with_infinite_output_kernel_gradient(state.params), trainer.state_sharding.params))
  before = jax.device_get(state)
  state, metrics = trainer.step(state, _batch(1))
  assert np.isfinite(float(metrics["loss/diffusion"]))  # only the gradient is broken
  assert not np.isfinite(float(metrics["grad_norm/unet"]))
  assert float(metrics["nonfinite/skipped"]) == 1.0
  assert int(state.step) == 2 and int(state.nonfinite_streak) == 1
  kept = (state.params, state.ema_params, state.opt_state, state.rng)
  for got, want in zip(_host(kept), _host((before.params, before.ema_params, before.opt_state,
                                           before.rng)), strict=True):
    np.testing.assert_array_equal(got, want)  # nothing of the update was applied


def test_skipped_updates_and_their_streak_reach_the_summaries(stage2_trainer, tmp_path):
  trainer = stage2_trainer
  nan_steps = {2, 3}  # batch i is step i + 1's; a NaN in the batch makes the loss NaN
  batches = iter(grain.MapDataset.range(100).map(
      lambda index: _batch(index, nan=index + 1 in nan_steps)).to_iter_dataset())
  loop.train_loop(stage="Stage 2", state=trainer.initial_state(1.0, 0), step_fn=trainer.step,
                  data_iterator=batches, num_steps=4, log_every=1,
                  checkpointer=checkpointing.Checkpointer(tmp_path / "checkpoints", 1000, 1),
                  batch_size=8, summary_dir=tmp_path / "summaries", max_nonfinite_skips=5,
                  learning_rate_field="diffusion.optim.learning_rate")
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  events = event_accumulator.EventAccumulator(
      str(tmp_path / "summaries"), size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()

  def series(tag):
    return [(event.step, float(tensor_util.make_ndarray(event.tensor_proto)))
            for event in events.Tensors(tag)]

  assert series("nonfinite/skipped") == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 0.0)]
  assert series("nonfinite/streak") == [(1, 0.0), (2, 1.0), (3, 2.0), (4, 0.0)]


def test_the_time_budget_plans_the_last_step_from_the_measured_rate():
  assert loop.budgeted_last_step(50, 1200, steps_per_second=2.0, seconds_left=100.0) == 250
  assert loop.budgeted_last_step(50, 1200, 2.0, seconds_left=0.4) == 50  # 0.8 of a step
  assert loop.budgeted_last_step(50, 1200, 2.0, seconds_left=-30.0) == 50  # deadline past
  assert loop.budgeted_last_step(50, 1200, 2.0, seconds_left=1e6) == 1200
  stage1, stage2 = loop.stage_deadlines(100.0, minutes=10.0, stage1_share=0.4)
  assert stage1 == pytest.approx(100.0 + 240.0)
  assert stage2 == pytest.approx(100.0 + (1.0 - loop.SAMPLING_SHARE) * 600.0)


def test_a_stage_past_its_deadline_stops_and_a_budgeted_rerun_keeps_the_stop(
    stage2_trainer, tmp_path, caplog):
  trainer = stage2_trainer
  finals = []

  def run(state, deadline):
    batches = iter(grain.MapDataset.range(100).map(_batch).to_iter_dataset())
    return loop.train_loop(
        stage="Stage 2", state=state, step_fn=trainer.step, data_iterator=batches,
        num_steps=6, log_every=2, batch_size=8,
        checkpointer=checkpointing.Checkpointer(tmp_path / "checkpoints", 1000, 3),
        summary_dir=tmp_path / "summaries", max_nonfinite_skips=5,
        learning_rate_field="diffusion.optim.learning_rate", deadline=deadline,
        budget_minutes=14.0,
        on_step=lambda step, state, writer, final: finals.append((step, final)))

  # Past its deadline at the first log step: the stage ends there, as if num_steps were 2.
  state = run(trainer.initial_state(1.0, 0), deadline=time.monotonic() - 1.0)
  assert int(state.step) == 2 and finals == [(1, False), (2, True)]
  assert "6 steps do not fit the time budget" in caplog.text
  assert "stopping at step 2 instead" in caplog.text
  checkpointer = checkpointing.Checkpointer(tmp_path / "checkpoints", 1000, 3)
  assert checkpointer.latest_step() == 2  # the final save, though checkpoint_every is 1000
  record = json.loads((tmp_path / loop.BUDGET_STOP_FILE).read_text())
  assert record == {"stopped_at_step": 2, "num_steps": 6, "time_budget_minutes": 14.0}
  assert loop.budget_stop(checkpointer) == 2
  # A later run with a budget finds the stage trained; one without trains on.
  assert loop.nothing_to_train("Stage 2", 2, 6, checkpointer, budgeted=True)
  assert not loop.nothing_to_train("Stage 2", 2, 6, checkpointer, budgeted=False)
  assert not loop.nothing_to_train("Stage 2", 0, 6, checkpointer, budgeted=True)
  checkpointer.close()

  # A deadline an hour away binds nothing: the stage runs on to num_steps.
  finals.clear()
  state = run(state, deadline=time.monotonic() + 3600.0)
  assert int(state.step) == 6 and finals == [(3, False), (4, False), (5, False), (6, True)]


def test_train_mode_gives_each_stage_its_deadline_and_refuses_a_budget_on_several_processes(
    tmp_path, monkeypatch):
  from vqvdm_jax import main
  from vqvdm_jax.config import ConfigError
  from vqvdm_jax.inference import model as model_lib
  deadlines = {}
  monkeypatch.setattr(vqgan_trainer, "train_vqgan",
                      lambda config, workdir, deadline: deadlines.update(stage1=deadline))
  monkeypatch.setattr(diffusion_trainer, "train_diffusion",
                      lambda config, workdir, deadline: deadlines.update(stage2=deadline))

  class Loaded:
    def write_samples(self, directory):
      deadlines["samples"] = directory

  monkeypatch.setattr(model_lib, "load", lambda workdir, config: Loaded())
  config = load_config("tiny")
  config.run.time_budget_minutes = 10.0
  before = time.monotonic()
  main.run("train", config, str(tmp_path))
  after = time.monotonic()
  assert before + 240.0 <= deadlines["stage1"] <= after + 240.0  # 0.4 of 10 minutes
  share = 1.0 - loop.SAMPLING_SHARE
  assert before + share * 600.0 <= deadlines["stage2"] <= after + share * 600.0
  assert "samples" in deadlines
  deadlines.clear()
  main.run("train_vqgan", config, str(tmp_path))  # a budget binds --mode=train only
  assert deadlines == {"stage1": None}
  config.run.time_budget_minutes = 0.0
  deadlines.clear()
  main.run("train", config, str(tmp_path))
  assert deadlines["stage1"] is None and deadlines["stage2"] is None
  config.run.time_budget_minutes = 10.0
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ConfigError, match="needs one process"):
    main.run("train", config, str(tmp_path))


STEP = 3  # the step of the checkpoints whose EMA weights differ from their raw weights


def _shifted(tree):
  return jax.tree.map(lambda leaf: leaf + 0.5, tree)


@pytest.fixture(scope="module")
def ema_workdir(tmp_path_factory):
  """A workdir whose stage-1 and stage-2 checkpoints hold EMA weights unlike their raw weights.

  Returns the config, the workdir, the stage-1 trainer and both saved states (on the host).
  """
  workdir = tmp_path_factory.mktemp("ema")
  config = load_config("tiny")
  devices = jax.devices()[:1]
  step = jnp.asarray(STEP, jnp.int32)
  vqgan = vqgan_trainer.VQGANTrainer(config, workdir, devices)
  vqgan_state = vqgan.initial_state()
  vqgan_state = vqgan_state.replace(step=step, ema_params=_shifted(vqgan_state.params))
  vqgan.checkpointer.save(STEP, vqgan_state, force=True)
  vqgan.checkpointer.close()
  diffusion = diffusion_trainer.DiffusionTrainer(config, workdir, latent_shape(config)[1:],
                                                 devices)
  diffusion_state = diffusion.initial_state(1.0, STEP)
  diffusion_state = diffusion_state.replace(step=step,
                                            ema_params=_shifted(diffusion_state.params))
  diffusion.checkpointer.save(STEP, diffusion_state, force=True)
  diffusion.checkpointer.close()
  workdir_lib.check_or_record_config(config, workdir)
  return config, workdir, vqgan, jax.device_get(vqgan_state), jax.device_get(diffusion_state)


def _assert_equal_trees(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(_host(got), _host(want), strict=True):
    np.testing.assert_array_equal(a, b)


def test_sampling_and_evaluation_load_the_ema_weights(ema_workdir):
  config, workdir, _, vqgan_state, diffusion_state = ema_workdir
  assert config.vqgan.optim.ema_decay > 0
  model = vqvdm_jax.load(workdir, devices=jax.devices()[:1])  # what sample and evaluate use
  assert model.step == STEP
  _assert_equal_trees(model.params, diffusion_state.ema_params)
  _assert_equal_trees(model.tokenizer.variables["params"], vqgan_state.ema_params)
  tokenizer = vqvdm_jax.load_tokenizer(workdir, devices=jax.devices()[:1])  # evaluate_vqgan's
  _assert_equal_trees(tokenizer.variables["params"], vqgan_state.ema_params)
  _assert_equal_trees(vqgan_trainer.eval_params(vqgan_state, config), vqgan_state.ema_params)

  no_ema = copy.deepcopy(config)  # a run that kept no EMA copy: the raw weights
  no_ema.vqgan.optim.ema_decay = 0.0
  tokenizer = vqvdm_jax.load_tokenizer(workdir, config=no_ema, devices=jax.devices()[:1])
  _assert_equal_trees(tokenizer.variables["params"], vqgan_state.params)
  _assert_equal_trees(vqgan_trainer.eval_params(vqgan_state, no_ema), vqgan_state.params)


def _files(directory):
  return sorted(str(path.relative_to(directory)) for path in directory.rglob("*")
                if path.is_file()) if directory.exists() else []


def _write_everything(ema_workdir, model, out, monkeypatch):
  """Summaries, reconstructions and samples into ``out``, as the process that runs this."""
  config, _, vqgan, vqgan_state, _ = ema_workdir
  writer = reporting.make_metric_writer(out / "summaries")
  reporting.write_config(writer, config)
  writer.write_scalars(1, {"loss/l2": 0.5})
  writer.write_images(1, {"frames": np.zeros((1, 8, 8, 3), np.uint8)})
  writer.flush()
  videos = np.zeros((2, config.data.num_frames, config.data.resolution, config.data.resolution,
                     3), np.uint8)
  monkeypatch.setattr(vqgan, "workdir", out / "vqgan")  # where write_reconstructions writes
  vqgan_trainer.write_reconstructions(vqgan, vqgan_state, videos, STEP)
  sampling.write_samples(model, out / "samples", sampling.sampling_config(
      config, num_videos=1, batch_size=1, num_steps=2))


def test_only_process_0_writes_summaries_and_videos(ema_workdir, tmp_path, monkeypatch):
  model = vqvdm_jax.load(ema_workdir[1], devices=jax.devices()[:1])
  _write_everything(ema_workdir, model, tmp_path / "process_0", monkeypatch)
  written = _files(tmp_path / "process_0")
  assert any(name.startswith("summaries/events.out.tfevents") for name in written), written
  assert {"vqgan/reconstructions/step_0000003.gif", "samples/grid.gif", "samples/samples.json",
          "samples/videos.npz", "samples/video_000_class_0.mp4"} <= set(written), written

  monkeypatch.setattr(jax, "process_index", lambda: 1)
  _write_everything(ema_workdir, model, tmp_path / "process_1", monkeypatch)
  assert _files(tmp_path / "process_1") == []


def _adaptive_weight_and_gradient_norm(config, trainer, state, batch):
  """λ = ‖∇_{G_L} L_rec‖ / (‖∇_{G_L} L_disc‖ + δ) at the decoder's last conv (Taming eq. 7), and
  ‖∇ (L_rec + w_VQ L_VQ + w_disc λ L_disc + w_aux L_disc_aux)‖, of the first step of ``state``,
  each gradient of its own forward pass."""
  loss = config.vqgan.loss
  model, discriminator = make_vqgan(config), vqgan_trainer.make_discriminator(config)
  video = pipeline.to_model_input(batch["video"])
  rng = jax.random.split(jax.random.fold_in(state.rng, state.step))[0]
  lpips_rng, quantizer_rng = jax.random.split(rng)

  def terms(params):
    (x_hat, quantized), _ = model.apply(
        {"params": params, "quantizer_state": state.quantizer_state}, video, train=True,
        mutable=["quantizer_state"], rngs={"quantizer": quantizer_rng})
    reconstruction = (loss.l2_weight * losses.l2_reconstruction_loss(video, x_hat)
                      + loss.lpips_weight * losses.video_lpips(
                          trainer.lpips_module, trainer.lpips_params, video, x_hat,
                          loss.lpips_frames, lpips_rng))
    logits_fake, features_fake = discriminator.apply({"params": state.disc_params}, x_hat)
    _, features_real = discriminator.apply({"params": state.disc_params}, video)
    return {"reconstruction": reconstruction, "vq": quantized.loss,
            "adversarial": losses.generator_adversarial_loss(logits_fake, loss.gan_loss),
            "feature_matching": losses.feature_matching_loss(features_real, features_fake)}

  @jax.jit
  def weight_and_norm(params):
    def last_layer(term):
      grads = jax.grad(lambda p: terms(p)[term])(params)
      return jnp.linalg.norm(grads["decoder"]["conv_out"]["kernel"])
    weight = jnp.clip(last_layer("reconstruction") / (last_layer("adversarial") + 1e-6), 0.0,
                      loss.adaptive_weight_max)
    def total(p):
      t = terms(p)
      return (t["reconstruction"] + loss.vq_weight * t["vq"]
              + loss.disc_weight * weight * t["adversarial"]
              + loss.feature_matching_weight * t["feature_matching"])
    grads = jax.grad(total)(params)
    return weight, optax.tree.norm(grads)

  return jax.device_get(weight_and_norm(state.params))


def test_stage1_options_through_the_trainer_ema_codebook_hinge_adaptive_weight_lecam(tmp_path):
  """One compiled step with every optional stage-1 term on: each moves what it should."""
  config = stage1_options_config()
  trainer = vqgan_trainer.VQGANTrainer(config, tmp_path, devices=jax.devices()[:1])
  trainer.checkpointer.close()
  state = trainer.initial_state()
  before = jax.device_get(state)
  video = np.random.default_rng(0).integers(0, 256, (8, 8, 16, 16, 3), dtype=np.uint8)
  batch = {"video": video, "label": np.arange(8, dtype=np.int32) % 4,
           "fps": np.full(8, 8.0, np.float32)}
  state, metrics = trainer.step(state, batch)
  metrics = jax.device_get(metrics)
  assert all(np.isfinite(value) for value in metrics.values()), metrics
  assert float(metrics["gan/active"]) == 1.0 and float(metrics["nonfinite/skipped"]) == 0.0
  # LPIPS is in the reconstruction term: L2 alone would be smaller.
  assert float(metrics["loss/lpips"]) > 0.0
  assert float(metrics["loss/reconstruction"]) == pytest.approx(
      config.vqgan.loss.l2_weight * float(metrics["loss/l2"]) + float(metrics["loss/lpips"]),
      rel=1e-5)
  # Taming's ratio (eq. 7) and the gradient it scales, computed here as plain gradients of each
  # term's own forward pass: the step takes them from one forward pass and its pullbacks.
  weight, grad_norm = _adaptive_weight_and_gradient_norm(config, trainer, before, batch)
  assert float(metrics["gan/adaptive_weight"]) != pytest.approx(1.0)
  assert float(metrics["gan/adaptive_weight"]) == pytest.approx(weight, rel=1e-4)
  assert float(metrics["grad_norm/generator"]) == pytest.approx(grad_norm, rel=1e-4)
  # The EMA codebook moves without a gradient: it is quantizer state, not a parameter.
  assert any(not np.array_equal(a, b) for a, b in zip(
      _host(state.quantizer_state), _host(before.quantizer_state), strict=True))
  # The discriminator trained (hinge), and LeCam's EMAs left zero towards the mean logits.
  assert any(not np.array_equal(a, b) for a, b in zip(
      _host(state.disc_params), _host(before.disc_params), strict=True))
  assert float(state.lecam_ema["real"]) == pytest.approx(
      (1 - config.vqgan.loss.lecam_ema_decay) * float(metrics["gan/logits_real"]), rel=1e-4)


def test_the_demos_stage2_path_v_prediction_adagn_ddim_and_guidance_interval(tmp_path):
  """configs/demo.py's stage-2 choices on the tiny U-Net: a train step, then its sampler; a
  guidance interval changes the samples (the steps outside it are unguided)."""
  config = load_config("tiny")
  demo = load_config("demo")
  config.diffusion.prediction = demo.diffusion.prediction
  config.diffusion.unet.scale_shift_norm = demo.diffusion.unet.scale_shift_norm
  config.diffusion.sample.sampler = demo.diffusion.sample.sampler
  assert (config.diffusion.prediction, config.diffusion.unet.scale_shift_norm,
          config.diffusion.sample.sampler) == ("v", True, "ddim")
  trainer = diffusion_trainer.DiffusionTrainer(config, tmp_path, LATENT_SHAPE,
                                               devices=jax.devices()[:1])
  trainer.checkpointer.close()
  state, metrics = trainer.step(trainer.initial_state(1.0, 0), _batch(0))
  assert np.isfinite(float(metrics["loss/diffusion"]))
  labels, fps = jnp.arange(4) % 4, jnp.full((4,), 8.0)
  samples = {}
  half = config.diffusion.schedule.num_steps // 2
  for interval in ((), (0, half)):  # every step; the low-noise half only
    config.diffusion.sample.guidance_interval = interval
    sample_fn = jax.jit(sampling.make_sample_fn(config, trainer.unet, trainer.schedule,
                                                LATENT_SHAPE))
    samples[interval] = np.asarray(sample_fn(state.params, labels, fps, video_keys(0, 0, 4)))
    assert np.all(np.isfinite(samples[interval]))
  assert not np.allclose(*samples.values())


def test_latents_source_encoder_gives_stage2_the_continuous_latent_and_sampling_quantizes_it():
  """``diffusion.latents.source='encoder'`` gives stage 2 the encoder's output before the
  quantizer (the default 'quantized' path is what every pipeline test runs), and a sampled
  latent is still quantized before decoding (README, stage-2 options)."""
  config = load_config("tiny")
  config.diffusion.latents.source = "encoder"
  model = make_vqgan(config)
  # Jitted: one compile of the init costs half of running it op by op (each op compiled alone).
  variables = jax.jit(lambda rng: init_variables(config, model, rng))(jax.random.PRNGKey(0))
  tokenizer = Tokenizer(config, variables["params"], variables["quantizer_state"], step=0,
                        model=model)
  data = config.data
  video = np.random.default_rng(0).integers(
      0, 256, (2, data.num_frames, data.resolution, data.resolution, 3), dtype=np.uint8)
  continuous, quantized = tokenizer.encode_for_diffusion(video), tokenizer.encode(video)
  assert continuous.shape == quantized.shape
  codebook = np.asarray(variables["params"]["quantizer"]["codebook"])
  def distance_to_codes(latent):
    return np.min(np.linalg.norm(latent.reshape(-1, 1, codebook.shape[-1]) - codebook, axis=-1),
                  axis=-1)
  assert distance_to_codes(quantized).max() < 1e-5  # the quantizer's output: codes
  assert distance_to_codes(continuous).min() > 1e-3  # the encoder's: no vector on a code
  # Decoding quantizes first: the encoder's latent decodes like its quantized version.
  np.testing.assert_array_equal(np.asarray(tokenizer.decode_latents(jnp.asarray(continuous))),
                                tokenizer.decode(quantized))
