"""VQ-VAE-2's two-level tokenizer (models/hierarchy.py): shapes, the flow between the levels,
the packed latent stage 2 sees, its train step (on one device and sharded) and checkpoint, the
per-level evaluation metrics, and two-level sampling."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config, relative_update_difference

from vqvdm_jax import config as config_lib
from vqvdm_jax import losses
from vqvdm_jax.data import pipeline
from vqvdm_jax.evaluation import evaluate_vqgan as evaluate_vqgan_lib
from vqvdm_jax.evaluation import reconstruction
from vqvdm_jax.evaluation.evaluate_vqgan import evaluate_vqgan
from vqvdm_jax.inference.model import load
from vqvdm_jax.models import hierarchy
from vqvdm_jax.models.vqgan import latent_shape, make_vqgan
from vqvdm_jax.training import diffusion_trainer, vqgan_trainer

KEYS = {"params": jax.random.PRNGKey(0), "quantizer": jax.random.PRNGKey(1)}


def two_level(config):
  config.vqgan.model.hierarchy.levels = 2
  config.vqgan.model.hierarchy.quantizer.codebook_size = 16
  # The tests compile these models: without attention and with one-op 3D convolutions they
  # compile faster, and nothing tested here depends on either.
  config.vqgan.model.attention_at_lowest = False
  config.vqgan.model.conv_impl = "native"
  return config


def abstract_indices(config):
  """Shapes of ``encode_to_indices`` for one clip of ``config.data``, by shape evaluation (one
  trace of the encoder side: the decoder is neither built nor traced)."""
  model = make_vqgan(config)
  data = config.data
  video = jax.ShapeDtypeStruct((1, data.num_frames, data.resolution, data.resolution, 3),
                               jnp.float32)
  return jax.eval_shape(lambda x: model.init_with_output(
      KEYS, x, method="encode_to_indices")[0], video)


@pytest.mark.parametrize("name, arg, bottom, top", [
    ("ucf101", None, (1, 4, 16, 16), (1, 2, 8, 8)),
    ("demo", "hierarchical", (1, 2, 8, 8), (1, 1, 4, 4)),
])
def test_latent_shapes_of_both_levels(name, arg, bottom, top):
  config = load_config(name, arg)
  if arg is None:
    config = two_level(config)
  config_lib.validate(config)
  indices = abstract_indices(config)
  assert indices["bottom"].shape == bottom and indices["top"].shape == top
  # Stage 2 sees both levels packed on the bottom grid: 4 + 4 channels.
  assert latent_shape(config) == (*bottom, 8)


def test_one_level_model_keeps_its_parameter_tree():
  config = load_config("tiny")
  video = jax.ShapeDtypeStruct((1, 8, 16, 16, 3), jnp.float32)
  params = jax.eval_shape(make_vqgan(config).init, KEYS, video)["params"]
  assert set(params) == {"encoder", "quantizer", "decoder"}
  assert params["encoder"]["conv_out"]["kernel"].shape[-1] == 4  # the latent, not features


@pytest.mark.parametrize("top_kind, bottom_kind", [("vq", "fsq"), ("ema", "lfq"),
                                                   ("fsq", "vq"), ("lfq", "ema")])
def test_every_quantizer_kind_works_at_each_level(top_kind, bottom_kind):
  config = two_level(load_config("tiny"))
  config.vqgan.quantizer.kind = bottom_kind
  config.vqgan.model.hierarchy.quantizer.kind = top_kind
  config_lib.validate(config)
  model = make_vqgan(config)
  video = jax.ShapeDtypeStruct((2, 8, 16, 16, 3), jnp.float32)
  # One trace: the training forward pass, run by init (its outputs and every variable).
  (x_hat, quantized), variables = jax.eval_shape(
      lambda x: model.init_with_output(KEYS, x, train=True), video)
  assert {"quantizer", "top_quantizer"} <= set(variables["quantizer_state"])
  assert x_hat.shape == video.shape
  assert {"usage", "perplexity", "top/usage", "top/perplexity"} <= set(quantized.stats)


def test_pack_and_unpack_levels_are_inverse():
  rng = np.random.default_rng(0)
  bottom = jnp.asarray(rng.normal(size=(2, 4, 8, 8, 3)), jnp.float32)
  top = jnp.asarray(rng.normal(size=(2, 2, 4, 4, 5)), jnp.float32)
  packed = hierarchy.pack_levels(bottom, top, (2, 2))
  assert packed.shape == (2, 4, 8, 8, 8)
  np.testing.assert_array_equal(packed[:, 1, 3, 2, 3:], top[:, 0, 1, 1])  # a repeat of its cell
  got_bottom, got_top = hierarchy.unpack_levels(packed, 3, (2, 2))
  np.testing.assert_array_equal(got_bottom, bottom)
  np.testing.assert_allclose(got_top, top, rtol=1e-6)


def test_top_factor_must_divide_the_bottom_latent():
  config = two_level(load_config("tiny"))  # bottom latent 2 x 4 x 4
  config.vqgan.model.hierarchy.temporal_downsample = 4
  with pytest.raises(config_lib.ConfigError, match="hierarchy.temporal_downsample"):
    config_lib.validate(config)


@pytest.fixture(scope="module")
def tiny_outputs():
  """The tiny two-level tokenizer at its initial weights on two clips: every output the tests
  below read, computed in one compiled function (one compilation instead of a dozen)."""
  config = two_level(load_config("tiny"))
  # Codes near the origin, so that the untrained top latents spread over several of them (at
  # the default scale every position picks the one code nearest 0, and a mean changes nothing).
  config.vqgan.model.hierarchy.quantizer.codebook_init_stddev = 0.05
  model = make_vqgan(config)
  video = jax.random.uniform(jax.random.PRNGKey(2), (2, 8, 16, 16, 3), minval=-1, maxval=1)

  def run(video):
    apply = functools.partial(model.apply, model.init(KEYS, video))
    features, top_latent = apply(video, method="encode_top")
    top_codes = apply(  # every position holds code 0 (first clip) or code 1 (second)
        jnp.repeat(jnp.arange(2), top_latent[0, ..., 0].size).reshape(top_latent.shape[:-1]),
        method=lambda module, i: module.top_quantizer.codes_from_indices(i))
    packed = apply(apply(video, method="encode"), method="quantize").quantized
    levels = apply(video, method="reconstruct_levels")
    # encode_to_indices' codes are these (both come from _quantize_levels): one encoder less
    indices = {"bottom": levels["indices"], "top": levels["top_indices"]}
    # Decoded as one batch (the decoder treats clips independently): the packed latent, then
    # with the bottom's, then the top's channels zeroed, then each set to its batch mean (the
    # top's repeats weigh its positions equally, so that is the top codes' mean too).
    zero_bottom, zero_top = packed.at[..., :4].set(0.0), packed.at[..., 4:].set(0.0)
    mean = lambda x: jnp.mean(x, axis=(0, 1, 2, 3))  # noqa: E731
    mean_bottom = packed.at[..., :4].set(mean(packed[..., :4]))
    mean_top = packed.at[..., 4:].set(mean(packed[..., 4:]))
    return {
        "levels": levels,
        # one clip's bottom features under two different top codes
        "bottom": apply(jnp.concatenate([features[:1]] * 2), top_codes, method="encode_bottom"),
        "top_indices": apply(top_latent, method=lambda module, z: module.top_quantizer(z).indices),
        "packed": packed, "snapped": apply(packed, method="nearest_codes"),
        "from_indices": hierarchy.pack_levels(*apply(indices, method=lambda module, i: (
            module.quantizer.codes_from_indices(i["bottom"]),
            module.top_quantizer.codes_from_indices(i["top"]))), (2, 2)),
        "decoded": jnp.split(apply(jnp.concatenate(
            [packed, zero_bottom, zero_top, mean_bottom, mean_top]), method="decode"), 5)}

  return jax.device_get(jax.jit(run)(video))


def mean_difference(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).mean())


def test_bottom_encoder_output_changes_with_the_top_codes(tiny_outputs):
  with_code_0, with_code_1 = tiny_outputs["bottom"]
  assert mean_difference(with_code_0, with_code_1) > 1e-2 * np.abs(with_code_0).mean()


def test_decoder_reads_both_levels(tiny_outputs):
  levels = tiny_outputs["levels"]
  x_hat, zero_bottom, zero_top, _, _ = tiny_outputs["decoded"]  # from the packed latent
  np.testing.assert_allclose(levels["both"], x_hat, atol=1e-5)
  assert mean_difference(zero_bottom, x_hat) > 1e-3 and mean_difference(zero_top, x_hat) > 1e-3
  # Each level alone: the other's codes become their batch mean, so the output changes too
  # (given codes that differ: the fixture's untrained top level uses several).
  assert len(np.unique(tiny_outputs["top_indices"])) > 1
  for name in ("top_only", "bottom_only"):
    assert mean_difference(levels[name], x_hat) > 1e-3, name


def test_each_level_alone_is_decoded_with_the_other_levels_codes_at_their_mean(tiny_outputs):
  """What evaluate_vqgan's top_only / bottom_only report, against the packed-latent decoder:
  a swap of the two (they differ here) fails."""
  levels = tiny_outputs["levels"]
  *_, mean_bottom, mean_top = tiny_outputs["decoded"]
  np.testing.assert_allclose(levels["top_only"], mean_bottom, atol=1e-5)
  np.testing.assert_allclose(levels["bottom_only"], mean_top, atol=1e-5)
  assert mean_difference(levels["top_only"], levels["bottom_only"]) > 1e-3


def test_packed_latent_surface_agrees_with_the_code_indices(tiny_outputs):
  """What stage 2 uses: encode -> quantize -> (sample) -> nearest_codes, packed; and the
  indices of both levels give the same codes."""
  packed = tiny_outputs["packed"]
  assert packed.shape == (2, 2, 4, 4, 8)
  np.testing.assert_allclose(tiny_outputs["snapped"], packed, atol=1e-6)
  np.testing.assert_allclose(tiny_outputs["from_indices"], packed, atol=1e-6)


def train_config():
  """The tiny two-level tokenizer with the GAN on from the first step, an EMA top codebook
  (its state moves too), no LPIPS term (VGG would cost more to compile than the model) and a
  batch of two (one clip per device in the sharded test)."""
  config = two_level(load_config("tiny"))
  config.vqgan.loss.disc_start = 0
  config.vqgan.loss.lpips_weight = 0.0
  config.vqgan.model.hierarchy.quantizer.kind = "ema"
  config.vqgan.train.batch_size = 2
  # The sampling test's untrained U-Net: one level, no attention, one-op convolutions (it
  # compiles in half the time, and nothing tested depends on its depth).
  unet = config.diffusion.unet
  unet.channel_multipliers, unet.attention_levels, unet.conv_impl = (1,), (), "native"
  return config


@pytest.fixture(scope="module")
def trainer_and_step(tmp_path_factory):
  """A two-level stage-1 trainer on one device, its state after one step, that state saved as
  the workdir's step-1 checkpoint, and how often VGG was loaded or run (it should not be)."""
  config = train_config()
  workdir = tmp_path_factory.mktemp("two_level")
  vgg_calls = {"load_lpips": 0, "video_lpips": 0}

  def counted(name, function):
    def wrapper(*args, **kwargs):
      vgg_calls[name] += 1  # at trace time: a function left out of the step is never traced
      return function(*args, **kwargs)
    return wrapper

  config_lib.clear_per_config_caches()  # the counts are taken while the step is traced
  with pytest.MonkeyPatch.context() as patch:
    for name in vgg_calls:
      patch.setattr(vqgan_trainer.losses, name, counted(name, getattr(vqgan_trainer.losses, name)))
    trainer = vqgan_trainer.VQGANTrainer(config, workdir, devices=jax.devices()[:1])
    batch = {"video": np.asarray(jax.random.randint(
        jax.random.PRNGKey(3), (2, 8, 16, 16, 3), 0, 256), np.uint8)}
    initial = jax.device_get(trainer.initial_state())
    state, metrics = trainer.step(trainer.initial_state(), batch)
  config_lib.clear_per_config_caches()  # later trainers trace without the counting wrappers
  saved = jax.device_get(state)
  trainer.checkpointer.save(1, state, force=True)
  trainer.checkpointer.wait_until_finished()
  yield trainer, workdir, batch, initial, saved, jax.device_get(metrics), vgg_calls
  trainer.checkpointer.close()


def test_a_zero_lpips_weight_leaves_vgg_out_of_the_train_step(trainer_and_step):
  *_, metrics, vgg_calls = trainer_and_step
  assert vgg_calls == {"load_lpips": 0, "video_lpips": 0}
  assert metrics["loss/lpips"] == 0.0 and np.isfinite(metrics["loss/l2"])


def test_one_train_step_updates_both_levels_and_logs_each(trainer_and_step):
  _, _, _, initial, state, metrics, _ = trainer_and_step
  for name in ("codebook/usage", "codebook/top/usage", "codebook/top/perplexity",
               "quantizer/top/commitment", "loss/discriminator"):
    assert np.isfinite(metrics[name]), name
  assert metrics["gan/active"] == 1.0 and metrics["nonfinite/skipped"] == 0.0
  for module in ("top_encoder", "top_decoder", "bottom_head", "encoder", "decoder"):
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), state.params[module],
                         initial.params[module])
    assert max(jax.tree.leaves(moved)) > 0, module
  assert int(state.quantizer_state["top_quantizer"]["step"]) == 1
  assert not np.array_equal(state.quantizer_state["top_quantizer"]["codebook"],
                            initial.quantizer_state["top_quantizer"]["codebook"])


def test_a_restored_two_level_state_continues_bit_identically(trainer_and_step):
  trainer, _, batch, _, saved, *_ = trainer_and_step
  restored = trainer.restore_or_init()
  for got, want in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(saved),
                       strict=True):
    np.testing.assert_array_equal(got, want)
  continued, _ = trainer.step(restored, batch)
  again, _ = trainer.step(jax.device_put(saved, trainer.state_sharding), batch)
  for got, want in zip(jax.tree.leaves(jax.device_get(continued)),
                       jax.tree.leaves(jax.device_get(again)), strict=True):
    np.testing.assert_array_equal(got, want)


def test_sharded_two_level_step_matches_the_single_device_step(trainer_and_step, tmp_path):
  """The fixture's step (one device) again with the batch split over two: GAN, both
  quantizers' EMA codebooks and the top level's statistics reduce over the whole batch."""
  trainer, _, batch, initial, single, single_metrics, _ = trainer_and_step
  sharded = vqgan_trainer.VQGANTrainer(trainer.config, tmp_path, devices=jax.devices()[:2])
  assert sharded.mesh.size == 2
  # The fixture's initial state laid out on the two devices: the same start by construction,
  # without compiling the two-device init (~15 s of the suite; test_vqgan_training's sharded
  # test runs a multi-device init).
  state, metrics = sharded.step(jax.device_put(initial, sharded.state_sharding), batch)
  sharded.checkpointer.close()
  state, metrics = jax.device_get((state, metrics))
  for name in ("loss/generator", "loss/discriminator", "loss/vq", "quantizer/top/commitment",
               "codebook/perplexity", "codebook/top/perplexity"):
    np.testing.assert_allclose(metrics[name], single_metrics[name], rtol=1e-4, err_msg=name)
  # As for the one-level model (test_vqgan_training): Adam turns the rounding of near-zero
  # gradients into full steps, so the updates are compared as a whole.
  for field in ("params", "disc_params", "quantizer_state"):
    assert relative_update_difference(getattr(single, field), getattr(state, field),
                                      getattr(initial, field)) < 2e-2, field


class MeanAbsoluteDistance(nn.Module):
  """A stand-in for LPIPS in the evaluation test (VGG costs more to compile than the rest):
  the mean |a - b| of each frame pair, ``[N, 1, 1, 1]`` like LPIPS."""

  @nn.compact
  def __call__(self, frames_a, frames_b):
    return jnp.abs(frames_a - frames_b).mean(axis=(1, 2, 3), keepdims=True)


# Stand-ins for the three reconstructions of reconstruct_levels, each a different function of
# the clip: a level reported under the other's name, or the full one under a level's, shows.
STAND_INS = {"": ("both", lambda x: 0.9 * x), "top_only/": ("top_only", lambda x: 0.5 * x),
             "bottom_only/": ("bottom_only", lambda x: 0.2 - 0.6 * x)}


def test_evaluate_vqgan_reports_each_level_under_its_own_name(trainer_and_step, monkeypatch,
                                                              tmp_path):
  """PSNR, LPIPS and the colour check of the full reconstruction and of each level alone, as
  eval.json names them, against the same metrics of known stand-in reconstructions."""
  trainer, workdir, *_ = trainer_and_step
  config = trainer.config

  def stand_in_levels(module, video):
    del module
    batch = video.shape[0]
    return {**{name: function(video) for name, function in STAND_INS.values()},
            "indices": jnp.zeros((batch, 2, 4, 4), jnp.int32),
            "top_indices": jnp.ones((batch, 1, 2, 2), jnp.int32)}

  monkeypatch.setattr(hierarchy.HierarchicalVQGAN3D, "reconstruct_levels", stand_in_levels)
  monkeypatch.setattr(losses, "load_lpips", lambda: (MeanAbsoluteDistance(), {}))
  results = evaluate_vqgan(config, workdir, out_dir=tmp_path)
  assert json.loads((tmp_path / "eval.json").read_text()) == results
  clips = next(pipeline.eval_batches(config.data, config.vqgan.eval.num_clips,
                                     config.vqgan.eval.num_clips, config.seed))["video"]
  video = pipeline.to_model_input(clips)
  for prefix, (_, function) in STAND_INS.items():
    x_hat = jnp.clip(function(video), -1.0, 1.0)
    expected = {
        "psnr": reconstruction.psnr(video, x_hat),
        "lpips": jnp.abs(video - x_hat).mean(axis=(1, 2, 3, 4)),
        "sprite_colour_error": reconstruction.sprite_colour_error(
            clips, np.asarray(pipeline.to_uint8(x_hat)))}
    for name, values in expected.items():
      assert results[prefix + name] == pytest.approx(float(np.nanmean(values)), rel=1e-5), (
          prefix + name)
    assert -1 < results[prefix + "ssim"] < 1 and 0 <= results[prefix + "sprite_colour_pass"] <= 1
  # One code per level: a fraction of each level's own codebook (32 and 16 codes).
  assert (results["codebook_usage"], results["top/codebook_usage"]) == (1 / 32, 1 / 16)
  assert "top only" in evaluate_vqgan_lib.level_report(results)


def test_two_level_sampling_is_deterministic_for_a_seed(trainer_and_step):
  trainer, workdir, *_ = trainer_and_step
  config, devices = trainer.config, jax.devices()[:1]
  # An untrained U-Net over the packed latent, beside the tokenizer's step-1 checkpoint.
  stage2 = diffusion_trainer.DiffusionTrainer(config, workdir, latent_shape(config)[1:], devices)
  stage2.checkpointer.save(1, stage2.initial_state(1.0, 1), force=True)
  stage2.checkpointer.close()
  model = load(workdir, config=config, devices=devices)
  assert model.latent_shape == (2, 4, 4, 8)  # both levels packed for the U-Net
  first, again, other = (model.sample(labels=[0, 1], seed=seed, num_steps=2)
                         for seed in (0, 0, 1))
  assert first.shape == (2, 8, 16, 16, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
