"""Stage-1 training: sharding, exact resumption, learning, evaluation and the command line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import (
  load_config,
  relative_difference,
  relative_update_difference,
  stage1_options_config,
)

from vqvdm_jax.data import pipeline
from vqvdm_jax.evaluation.evaluate_vqgan import evaluate_vqgan
from vqvdm_jax.training import optimizers, vqgan_trainer

REPO = Path(__file__).resolve().parents[1]


def tree_arrays(tree):
  return [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_equal(a, b):
  for x, y in zip(tree_arrays(a), tree_arrays(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_sharded_train_step_matches_single_device(tmp_path):
  # Every optional term under the mesh too (VGG, the EMA codebook's batch statistics, the
  # adaptive weight's gradient norms, LeCam's EMAs), the discriminator trained from step 0.
  config = stage1_options_config()
  batches = pipeline.train_iterator(config.data, config.vqgan.train.batch_size, config.seed)
  batches = [next(batches) for _ in range(2)]
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    trainer = vqgan_trainer.VQGANTrainer(config, tmp_path / str(len(devices)), devices=devices)
    assert trainer.mesh.size == len(devices)
    initial = jax.device_get(trainer.initial_state())
    state = trainer.initial_state()
    for batch in batches:
      state, metrics = trainer.step(state, batch)
    results.append((jax.device_get(state), jax.device_get(metrics)))
    trainer.checkpointer.close()
  (state_1, metrics_1), (state_8, metrics_8) = results
  assert metrics_1["gan/active"] == 1.0
  for name in ("loss/generator", "loss/discriminator", "loss/lpips", "loss/vq"):
    np.testing.assert_allclose(metrics_1[name], metrics_8[name], rtol=1e-4, err_msg=name)
  # Adam turns float-rounding differences of near-zero gradients into full-size steps, so
  # compare the updates as a whole: a sharding bug changes them completely, rounding does not.
  for field in ("params", "disc_params"):
    assert relative_update_difference(getattr(state_1, field), getattr(state_8, field),
                                      getattr(initial, field)) < 2e-2, field
  # The EMA codebook's statistics and LeCam's EMAs are sums over the batch: sharded, to rounding.
  for field in ("quantizer_state", "lecam_ema"):
    assert relative_difference(getattr(state_1, field), getattr(state_8, field)) < 1e-5, field


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
  """The tiny config trained for 4 steps in one go."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  config = load_config("tiny")
  state = vqgan_trainer.train_vqgan(config, workdir)
  return config, workdir, jax.device_get(state)


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(uninterrupted_run, tmp_path,
                                                              monkeypatch):
  _, workdir, expected = uninterrupted_run
  # What a run killed after its step-2 checkpoint leaves: the uninterrupted run's own step-2
  # checkpoint (state and data iterator), written on the way, and nothing after it.
  shutil.copytree(workdir / "vqgan" / "checkpoints" / "2", tmp_path / "vqgan" / "checkpoints" / "2")
  config = load_config("tiny")

  def must_not_start_fresh(*args, **kwargs):
    raise AssertionError("a checkpoint exists; training must resume from it")

  monkeypatch.setattr(vqgan_trainer.VQGANTrainer, "initial_state", must_not_start_fresh)
  resumed = jax.device_get(vqgan_trainer.train_vqgan(config, tmp_path))
  assert int(resumed.step) == 4
  assert_trees_equal(resumed, expected)


def test_restore_returns_exactly_what_was_saved(uninterrupted_run):
  config, workdir, final = uninterrupted_run
  trainer = vqgan_trainer.VQGANTrainer(config, workdir)
  assert trainer.checkpointer.latest_step() == 4
  restored = trainer.checkpointer.restore(trainer.abstract_state())
  trainer.checkpointer.close()
  assert_trees_equal(restored, final)  # params, both optimizers, EMA, quantizer state, rng


def test_rerunning_a_finished_run_trains_no_further(uninterrupted_run):
  config, workdir, final = uninterrupted_run
  state = vqgan_trainer.train_vqgan(config, workdir)
  assert_trees_equal(jax.device_get(state), final)


def test_training_writes_checkpoints_reconstructions_and_summaries(uninterrupted_run):
  _, workdir, _ = uninterrupted_run
  stage = workdir / "vqgan"
  assert sorted(int(p.name) for p in (stage / "checkpoints").iterdir() if p.name.isdigit()) == [
      2, 4]
  assert (stage / "reconstructions" / "step_0000004.gif").exists()
  # TensorBoard shows the run: losses, learning rates, the config, reconstructions.
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(str(stage / "summaries"), size_guidance={
      event_accumulator.TENSORS: 0, event_accumulator.IMAGES: 0})
  events.Reload()
  tags = events.Tags()
  scalars = set(tags["tensors"]) | set(tags["scalars"])
  assert {"loss/l2", "learning_rate/generator", "learning_rate/discriminator"} <= scalars, tags
  assert "reconstructions" in set(tags["images"]) | set(tags["tensors"]), tags
  learning_rate = [event for event in events.Tensors("learning_rate/generator")]
  assert [event.step for event in learning_rate] == [2, 4]
  config = load_config("tiny")  # warm-up over 1 step: the peak from the first update on
  from tensorboard.util import tensor_util
  assert float(tensor_util.make_ndarray(learning_rate[-1].tensor_proto)) == pytest.approx(
      config.vqgan.optim.learning_rate)
  plugins = events.PluginTagToContent("hparams")
  assert plugins, "the config was not written as hparams"


def test_evaluate_vqgan_writes_reconstruction_metrics(uninterrupted_run):
  config, workdir, _ = uninterrupted_run
  results = evaluate_vqgan(config, workdir)
  written = json.loads((workdir / "vqgan" / "eval" / "000" / "eval.json").read_text())
  assert written == results
  assert written["step"] == 4 and written["num_clips"] == config.vqgan.eval.num_clips
  for name in ("psnr", "ssim", "lpips", "codebook_usage", "codebook_perplexity"):
    assert np.isfinite(written[name]), name
  assert 0 < written["codebook_usage"] <= 1
  assert (workdir / "vqgan" / "eval" / "000" / "eval_grid.gif").exists()
  # A second evaluation writes its own folder and leaves the first as it was.
  again = evaluate_vqgan(config, workdir)
  assert json.loads((workdir / "vqgan" / "eval" / "000" / "eval.json").read_text()) == results
  assert json.loads((workdir / "vqgan" / "eval" / "001" / "eval.json").read_text()) == again


def test_evaluate_without_checkpoint_says_how_to_train(tmp_path):
  with pytest.raises(FileNotFoundError, match="--mode=train_vqgan"):
    evaluate_vqgan(load_config("tiny"), tmp_path)


@pytest.mark.learning
def test_tiny_run_learns_more_than_a_constant_colour(tmp_path):
  """Four clips, reconstruction only: the error falls far below its start and below the best
  single colour's, whatever the CPU's instruction set (see README, Reproducibility).

  Clipping on and a moderate learning rate keep the trajectory smooth; the median of the last
  ten steps ignores a lone spike. Measured (median of the last 10 / first step, the tests' XLA
  flags, on an AVX2 EPYC): 0.055 / 0.515 with XLA:CPU's default code, 0.053 with AVX, 0.057 with
  SSE4_2; the bounds are 0.129 and 0.080.
  """
  config = load_config("tiny")
  config.data.num_train_clips = 4
  config.vqgan.train.batch_size = 4
  config.vqgan.loss.disc_start = 10_000  # reconstruction only: the GAN slows early fitting
  config.vqgan.optim.learning_rate = 1e-3
  config.vqgan.optim.grad_clip_norm = 1.0
  # The CPU rule's convolutions, not the tiny config's native one (chosen for the compile time
  # of few-step tests), on one device: at level 0 on one core this step runs in 0.19 s against
  # 0.41 s, and the test in 26 s against 40 s (2026-12-04; median/first 0.107 against 0.109).
  config.vqgan.model.conv_impl = "auto"
  trainer = vqgan_trainer.VQGANTrainer(config, tmp_path, devices=jax.devices()[:1])
  batches = pipeline.train_iterator(config.data, 4, config.seed)
  clips = next(pipeline.train_iterator(config.data, 4, config.seed))["video"]
  clips = clips.astype(np.float32) / 127.5 - 1.0
  constant_colour_error = float(np.mean((clips - clips.mean()) ** 2))  # 0.089 here
  state = trainer.initial_state()
  l2 = []
  for _ in range(60):
    state, metrics = trainer.step(state, next(batches))
    l2.append(float(metrics["loss/l2"]))
  trainer.checkpointer.close()
  settled = float(np.median(l2[-10:]))
  assert settled < 0.25 * l2[0], (l2[:3], l2[-10:])
  assert settled < 0.9 * constant_colour_error, (constant_colour_error, l2[-10:])


def test_command_line_rejects_inconsistent_config_naming_the_field(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "vqvdm_jax.main", f"--config={REPO / 'configs/tiny.py'}",
       f"--workdir={tmp_path}", "--config.data.num_frames=6"],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode != 0
  assert "config.data.num_frames" in result.stderr


def test_a_run_that_ends_before_disc_start_leaves_the_discriminator_out_for_the_same_result(
    tmp_path, monkeypatch):
  """The demo never reaches disc_start: its step is built without the GAN terms and the
  discriminator update (a ~30 % faster compile), and steps exactly like the step that skips
  them at run time."""
  traced = []
  monkeypatch.setattr(vqgan_trainer.losses, "discriminator_loss",
                      lambda *args, _loss=vqgan_trainer.losses.discriminator_loss:
                      traced.append(1) or _loss(*args))
  config = load_config("tiny")
  config.vqgan.loss.disc_start = 100
  config.vqgan.loss.lpips_weight = 0.0
  results = {}
  for num_steps in (4, 200):  # the run ends before disc_start; the run reaches it
    config.vqgan.train.num_steps = num_steps
    assert vqgan_trainer.gan_in_run(config) == (num_steps > 100)
    # So the run's length keys the programs: the two runs must not share one.
    assert (("vqgan.train.num_steps" in vqgan_trainer.program_ignores(config))
            == (num_steps > 100))
    traced.clear()
    trainer = vqgan_trainer.VQGANTrainer(config, tmp_path / str(num_steps),
                                         devices=jax.devices()[:1])
    batch = next(pipeline.train_iterator(config.data, config.vqgan.train.batch_size, 0))
    state, metrics = trainer.step(trainer.initial_state(), batch)
    trainer.checkpointer.close()
    results[num_steps] = jax.device_get((state, metrics)), len(traced)
  (short_run, short_traces), (long_run, long_traces) = results[4], results[200]
  assert short_traces == 0 and long_traces > 0  # only the longer run's step holds the GAN
  assert_trees_equal(short_run, long_run)


def test_discriminator_is_neither_run_nor_updated_before_disc_start(tmp_path, monkeypatch):
  """Before disc_start the GAN terms are skipped (lax.cond), not computed and zero-weighted.

  The run uses MAGVIT-v2's LFQ, so this is also LFQ through the trainer: its entropy terms reach
  the metrics and the encoder trains through the sign's straight-through gradient."""
  calls = {"generator": 0, "discriminator": 0}

  def counted(name, loss_fn):
    def wrapper(*args, **kwargs):
      jax.debug.callback(lambda: calls.__setitem__(name, calls[name] + 1))
      return loss_fn(*args, **kwargs)
    return wrapper

  monkeypatch.setattr(vqgan_trainer.losses, "generator_adversarial_loss",
                      counted("generator", vqgan_trainer.losses.generator_adversarial_loss))
  monkeypatch.setattr(vqgan_trainer.losses, "discriminator_loss",
                      counted("discriminator", vqgan_trainer.losses.discriminator_loss))
  config = load_config("tiny")
  config.vqgan.loss.disc_start = 1
  config.vqgan.quantizer.kind = "lfq"
  trainer = vqgan_trainer.VQGANTrainer(config, tmp_path, devices=jax.devices()[:1])
  batches = pipeline.train_iterator(config.data, config.vqgan.train.batch_size, config.seed)
  initial = jax.device_get(trainer.initial_state())
  state, metrics = trainer.step(trainer.initial_state(), next(batches))
  jax.effects_barrier()
  assert calls == {"generator": 0, "discriminator": 0}
  assert metrics["gan/active"] == 0.0 and metrics["loss/adversarial"] == 0.0
  after_first = jax.device_get(state)
  assert_trees_equal(after_first.disc_params, initial.disc_params)
  assert_trees_equal(after_first.disc_opt_state, initial.disc_opt_state)
  assert relative_difference(initial.params["encoder"], after_first.params["encoder"]) > 0
  assert relative_difference(initial.params["decoder"], after_first.params["decoder"]) > 0
  # LFQ's codebook entropy is at most log(2^d) and positive for an untrained encoder's signs.
  code_dim = config.vqgan.model.latent_channels
  assert 0 < float(metrics["quantizer/codebook_entropy"]) <= code_dim * np.log(2) + 1e-5
  assert float(metrics["quantizer/entropy_penalty"]) <= 1e-6

  state, metrics = trainer.step(state, next(batches))
  jax.effects_barrier()
  trainer.checkpointer.close()
  assert calls["generator"] >= 1 and calls["discriminator"] >= 1
  assert metrics["gan/active"] == 1.0 and metrics["loss/discriminator"] > 0
  assert relative_difference(after_first.disc_params, jax.device_get(state).disc_params) > 0


def test_learning_rate_warms_up_then_stays_or_decays_on_a_cosine():
  constant = optimizers.warmup_schedule(1e-3, 10)
  cosine = optimizers.warmup_schedule(1e-3, 10, "cosine", total_steps=110, final_fraction=0.1)
  for schedule in (constant, cosine):
    np.testing.assert_allclose(float(schedule(0)), 1e-4, rtol=1e-6)  # (0 + 1) / 10 of the peak
    np.testing.assert_allclose(float(schedule(9)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(constant(110)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(cosine(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(cosine(60)), 1e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)
  np.testing.assert_allclose(float(cosine(110)), 1e-4, rtol=1e-5)
  np.testing.assert_allclose(float(cosine(500)), 1e-4, rtol=1e-5)  # held past the end


def test_optimizer_follows_the_configured_decay():
  config = load_config("tiny")
  optim = config.diffusion.optim
  optim.update(learning_rate=1.0, warmup_steps=1, grad_clip_norm=0.0, lr_decay="cosine",
               final_learning_rate_fraction=0.0, b1=0.0, b2=0.0)
  tx = optimizers.make_optimizer(optim.learning_rate, optim, total_steps=3)
  params = {"w": np.zeros(())}
  state = tx.init(params)
  steps = []
  for _ in range(4):  # with b1 = b2 = 0 Adam's step is the learning rate times sign(grad)
    updates, state = tx.update({"w": np.ones(())}, state, params)
    steps.append(-float(updates["w"]))
  np.testing.assert_allclose(steps, [1.0, 1.0, 0.5, 0.0], atol=1e-3)
