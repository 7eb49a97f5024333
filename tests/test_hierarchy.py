"""VQ-VAE-2's two-level tokenizer (models/hierarchy.py): shapes, the flow between the levels,
the packed latent stage 2 sees, its train step and checkpoint, and two-level sampling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config

from vqvdm_jax import config as config_lib
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
  """Shapes of ``encode_to_indices`` for one clip of ``config.data``, by shape evaluation."""
  model = make_vqgan(config)
  data = config.data
  video = jax.ShapeDtypeStruct((1, data.num_frames, data.resolution, data.resolution, 3),
                               jnp.float32)
  variables = jax.eval_shape(model.init, KEYS, video)
  return jax.eval_shape(lambda v, x: model.apply(v, x, method="encode_to_indices"),
                        variables, video)


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
  variables = jax.eval_shape(model.init, KEYS, video)
  assert {"quantizer", "top_quantizer"} <= set(variables["quantizer_state"])
  (x_hat, quantized), updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=["quantizer_state"],
                               rngs={"quantizer": KEYS["quantizer"]}), variables, video)
  assert x_hat.shape == video.shape
  assert {"usage", "perplexity", "top/usage", "top/perplexity"} <= set(quantized.stats)
  assert "top_quantizer" in updates["quantizer_state"]


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


def test_token_priors_ask_for_a_one_level_tokenizer():
  config = two_level(load_config("tiny"))
  config.stage2 = "masked"
  with pytest.raises(config_lib.ConfigError, match="one-level tokenizer"):
    config_lib.validate(config)


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
    indices = apply(video, method="encode_to_indices")
    # Decoded as one batch: the packed latent, then with the bottom's, then the top's channels
    # zeroed (the decoder treats clips independently).
    zero_bottom, zero_top = packed.at[..., :4].set(0.0), packed.at[..., 4:].set(0.0)
    return {
        "levels": apply(video, method="reconstruct_levels"),
        # one clip's bottom features under two different top codes
        "bottom": apply(jnp.concatenate([features[:1]] * 2), top_codes, method="encode_bottom"),
        "top_indices": apply(top_latent, method=lambda module, z: module.top_quantizer(z).indices),
        "packed": packed, "snapped": apply(packed, method="nearest_codes"),
        "from_indices": hierarchy.pack_levels(*apply(indices, method=lambda module, i: (
            module.quantizer.codes_from_indices(i["bottom"]),
            module.top_quantizer.codes_from_indices(i["top"]))), (2, 2)),
        "decoded": jnp.split(apply(jnp.concatenate([packed, zero_bottom, zero_top]),
                                   method="decode"), 3)}

  return jax.device_get(jax.jit(run)(video))


def mean_difference(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).mean())


def test_bottom_encoder_output_changes_with_the_top_codes(tiny_outputs):
  with_code_0, with_code_1 = tiny_outputs["bottom"]
  assert mean_difference(with_code_0, with_code_1) > 1e-2 * np.abs(with_code_0).mean()


def test_decoder_reads_both_levels(tiny_outputs):
  levels = tiny_outputs["levels"]
  x_hat, zero_bottom, zero_top = tiny_outputs["decoded"]  # decoded from the packed latent
  np.testing.assert_allclose(levels["both"], x_hat, atol=1e-5)
  assert mean_difference(zero_bottom, x_hat) > 1e-3 and mean_difference(zero_top, x_hat) > 1e-3
  # Each level alone: the other's codes become their batch mean, so the output changes too
  # (given codes that differ: the fixture's untrained top level uses several).
  assert len(np.unique(tiny_outputs["top_indices"])) > 1
  for name in ("top_only", "bottom_only"):
    assert mean_difference(levels[name], x_hat) > 1e-3, name


def test_packed_latent_surface_agrees_with_the_code_indices(tiny_outputs):
  """What stage 2 uses: encode -> quantize -> (sample) -> nearest_codes, packed; and the
  indices of both levels give the same codes."""
  packed = tiny_outputs["packed"]
  assert packed.shape == (2, 2, 4, 4, 8)
  np.testing.assert_allclose(tiny_outputs["snapped"], packed, atol=1e-6)
  np.testing.assert_allclose(tiny_outputs["from_indices"], packed, atol=1e-6)


@pytest.fixture(scope="module")
def trainer_and_step(tmp_path_factory):
  """A two-level stage-1 trainer (GAN on from the first step), its state after one step, and
  that state saved as the workdir's step-1 checkpoint."""
  config = two_level(load_config("tiny"))
  config.vqgan.loss.disc_start = 0
  config.vqgan.model.hierarchy.quantizer.kind = "ema"  # the top level's state moves too
  workdir = tmp_path_factory.mktemp("two_level")
  trainer = vqgan_trainer.VQGANTrainer(config, workdir, devices=jax.devices()[:1])
  batch = {"video": np.asarray(jax.random.randint(jax.random.PRNGKey(3), (8, 8, 16, 16, 3), 0,
                                                  256), np.uint8)}
  initial = jax.device_get(trainer.initial_state())
  state, metrics = trainer.step(trainer.initial_state(), batch)
  saved = jax.device_get(state)
  trainer.checkpointer.save(1, state, force=True)
  trainer.checkpointer.wait_until_finished()
  yield trainer, workdir, batch, initial, saved, jax.device_get(metrics)
  trainer.checkpointer.close()


def test_one_train_step_updates_both_levels_and_logs_each(trainer_and_step):
  _, _, _, initial, state, metrics = trainer_and_step
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
  trainer, _, batch, _, saved, _ = trainer_and_step
  restored = trainer.restore_or_init()
  for got, want in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(saved),
                       strict=True):
    np.testing.assert_array_equal(got, want)
  continued, _ = trainer.step(restored, batch)
  again, _ = trainer.step(jax.device_put(saved, trainer.state_sharding), batch)
  for got, want in zip(jax.tree.leaves(jax.device_get(continued)),
                       jax.tree.leaves(jax.device_get(again)), strict=True):
    np.testing.assert_array_equal(got, want)


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
