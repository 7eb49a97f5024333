"""Config validation: bad values fail at start-up, naming the field."""

import copy

import jax
import ml_collections
import numpy as np
import pytest
from helpers import load_config

from vqvdm_jax import config as config_lib


@pytest.mark.parametrize("name", ["ucf101", "sky_timelapse", "demo", "tiny"])
def test_every_shipped_config_validates(name):
  config_lib.validate(load_config(name))


def test_runlocal_variant_is_a_short_run_of_the_real_model():
  full, smoke = load_config("ucf101"), load_config("ucf101", "runlocal")
  assert smoke.vqgan.train.num_steps < 10
  assert smoke.vqgan.model.to_dict() == full.vqgan.model.to_dict()


def test_clip_length_not_divisible_by_temporal_downsampling_names_the_field():
  config = load_config("tiny")
  config.data.num_frames = 6
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.num_frames.*divisible"):
    config_lib.validate(config)


def test_causal_tokenizer_needs_one_plus_multiple_of_factor_frames():
  config = load_config("tiny")
  config.vqgan.model.causal = True
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.num_frames.*1 \+ k"):
    config_lib.validate(config)
  config.data.num_frames = 9
  config_lib.validate(config)


def test_unknown_quantizer_is_rejected_with_choices():
  config = load_config("tiny")
  config.vqgan.quantizer.kind = "kmeans"
  with pytest.raises(config_lib.ConfigError, match=r"vqgan\.quantizer\.kind.*'vq', 'ema', 'lfq'"):
    config_lib.validate(config)


def test_fsq_levels_are_validated_against_the_latent_channels():
  config = load_config("tiny")
  config.vqgan.quantizer.kind = "fsq"
  config.vqgan.quantizer.fsq_levels = (8, 5, 5)
  with pytest.raises(config_lib.ConfigError, match=r"vqgan\.quantizer\.fsq_levels.*per latent"):
    config_lib.validate(config)
  config.vqgan.quantizer.fsq_levels = (8, 5, 5, 1)
  with pytest.raises(config_lib.ConfigError, match=r"vqgan\.quantizer\.fsq_levels.*>= 2"):
    config_lib.validate(config)
  config.vqgan.quantizer.fsq_levels = (8, 5, 5, 5)
  config_lib.validate(config)


def test_level_count_must_match_downsampling_factors():
  config = load_config("tiny")
  config.vqgan.model.channel_multipliers = (1, 2)
  with pytest.raises(config_lib.ConfigError, match="channel_multipliers"):
    config_lib.validate(config)


def test_spatial_patch_must_divide_the_spatial_factor_and_counts_in_the_levels():
  config = load_config("tiny")  # x4 time, x4 space: three levels
  config.vqgan.model.spatial_patch = 8
  with pytest.raises(config_lib.ConfigError, match=r"spatial_patch.*divides.*spatial_downsample"):
    config_lib.validate(config)
  config.vqgan.model.spatial_patch = 2  # time still needs two x2 steps: three levels
  config_lib.validate(config)
  config.vqgan.model.temporal_downsample = 2  # x2 time, x4 space after a 2 x 2 patch: two levels
  with pytest.raises(config_lib.ConfigError, match=r"channel_multipliers.*folding 2x2.*needs 2"):
    config_lib.validate(config)


def test_colour_shortcut_needs_three_latent_channels_and_one_level():
  config = load_config("tiny")
  config.vqgan.model.colour_shortcut = True
  config_lib.validate(config)
  config.vqgan.model.latent_channels = 2
  with pytest.raises(config_lib.ConfigError, match=r"colour_shortcut.*latent_channels=2"):
    config_lib.validate(config)
  config = load_config("demo", "hierarchical")
  config.vqgan.model.colour_shortcut = True
  with pytest.raises(config_lib.ConfigError, match=r"colour_shortcut.*one-level"):
    config_lib.validate(config)


@pytest.mark.parametrize("group", ["vqgan.model", "diffusion.unet"])
def test_too_few_channels_per_groupnorm_group_warns_with_the_fix(group):
  config = load_config("tiny")
  section = config.vqgan.model if group == "vqgan.model" else config.diffusion.unet
  section.channels, section.num_groups = 8, 4  # 2 channels per group
  with pytest.warns(UserWarning, match=rf"--config\.{group}\.num_groups=2 or fewer"):
    config_lib.validate(config)


def test_shipped_configs_keep_enough_channels_per_group(recwarn):
  for name in ("tiny", "demo", "ucf101", "sky_timelapse"):
    config_lib.validate(load_config(name))
  assert not [w for w in recwarn if "GroupNorm" in str(w.message)]


@pytest.mark.parametrize("field, value, message", [
    ("diffusion.optim.lr_decay", "linear", r"diffusion\.optim\.lr_decay.*'constant', 'cosine'"),
    ("vqgan.optim.final_learning_rate_fraction", 1.5, r"vqgan\.optim\.final_learning_rate"),
    ("diffusion.loss_weighting", "p2", r"diffusion\.loss_weighting.*'uniform', 'min_snr'"),
    ("diffusion.min_snr_gamma", 0.0, r"diffusion\.min_snr_gamma.*positive"),
    ("diffusion.sample.guidance_interval", (800, 200), r"guidance_interval.*start < end"),
    ("run.time_budget_minutes", -1.0, r"run\.time_budget_minutes.*>= 0"),
    ("run.stage1_time_share", 1.0, r"run\.stage1_time_share.*between 0 and 1"),
])
def test_bad_optimizer_and_loss_weighting_values_name_the_field(field, value, message):
  config = load_config("tiny")
  *parents, leaf = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_per_config_computes_once_per_config_content_and_hands_out_copies():
  calls = []

  @config_lib.per_config
  def shapes(config, batch_size=1):
    calls.append(batch_size)
    return {"latent": [batch_size, config.data.num_frames]}

  config = load_config("tiny")
  first = shapes(config)
  first["latent"].append("edited by a caller")
  assert shapes(load_config("tiny")) == {"latent": [1, 8]}  # an equal config: the cached result
  assert calls == [1]
  assert shapes(config, batch_size=2) == {"latent": [2, 8]}  # other arguments: a new entry
  config.data.num_frames = 16
  assert shapes(config) == {"latent": [1, 16]}  # an edited config: a new entry
  assert calls == [1, 2, 1]


def test_shape_evaluations_follow_the_config():
  from vqvdm_jax.models.vqgan import latent_shape
  from vqvdm_jax.training import diffusion_trainer

  config = load_config("tiny")
  assert latent_shape(config) == (1, 2, 4, 4, 4)
  config.vqgan.model.latent_channels = 6
  assert latent_shape(config) == (1, 2, 4, 4, 6)
  config.diffusion.unet.channels = 16
  state = diffusion_trainer.abstract_state(config, (2, 4, 4, 6))
  kernel = state.params["input_conv"]["kernel"]
  assert kernel.shape[-2:] == (6, 16)
  assert state.opt_state[1][0].mu["input_conv"]["kernel"] == kernel  # Adam's moments alike


def test_trainers_of_one_config_share_their_compiled_programs_until_cleared(tmp_path):
  from vqvdm_jax.training import diffusion_trainer, token_trainer, vqgan_trainer

  config = load_config("tiny")
  devices = jax.devices()[:1]
  first = vqgan_trainer.VQGANTrainer(config, tmp_path / "a", devices)
  second = vqgan_trainer.VQGANTrainer(load_config("tiny"), tmp_path / "b", devices)
  assert second.train_step is first.train_step and second._init is first._init
  assert second.abstract_state() is first.abstract_state()
  other_mesh = vqgan_trainer.VQGANTrainer(config, tmp_path / "c", jax.devices()[:2])
  assert other_mesh.train_step is not first.train_step
  config.vqgan.loss.disc_start = 3  # traced into the step: an edited config is a new program
  edited = vqgan_trainer.VQGANTrainer(config, tmp_path / "d", devices)
  assert edited.train_step is not first.train_step
  prior = load_config("tiny")
  prior.stage2 = "masked"
  assert (token_trainer.TokenTrainer(prior, tmp_path / "e", devices).train_step
          is token_trainer.TokenTrainer(prior, tmp_path / "f", devices).train_step)
  stage2 = [diffusion_trainer.DiffusionTrainer(load_config("tiny"), tmp_path / name, (2, 4, 4, 4),
                                               devices) for name in ("h", "i")]
  assert stage2[0].train_step is stage2[1].train_step
  from vqvdm_jax.inference.tokenizer import Tokenizer, abstract_variables
  shapes = abstract_variables(load_config("tiny"))  # programs build lazily: shapes will do
  tokenizers = [Tokenizer(load_config("tiny"), shapes["params"], shapes["quantizer_state"], step)
                for step in (1, 2)]
  assert tokenizers[0]._decode_indices is tokenizers[1]._decode_indices
  config_lib.clear_per_config_caches()
  again = vqgan_trainer.VQGANTrainer(load_config("tiny"), tmp_path / "g", devices)
  assert again.train_step is not first.train_step
  for trainer in (first, second, other_mesh, edited, again, *stage2):
    trainer.checkpointer.close()


def _perturbed(config, paths):
  """``config`` with every number and flag under each dotted path changed (strings and tuples
  are left: they have no generic other valid value)."""
  config = copy.deepcopy(config)

  def change(node, name):
    value = node[name]
    if isinstance(value, ml_collections.ConfigDict):
      for child in list(value.keys()):
        change(value, child)
    elif isinstance(value, bool):
      node[name] = not value
    elif isinstance(value, int):
      node[name] = value + 3
    elif isinstance(value, float):
      node[name] = value * 1.5 + 0.25

  for path in paths:
    *parents, leaf = path.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    change(node, leaf)
  return config


def _program_texts(stage, config):
  """The lowered programs of ``stage`` (a trainer's init and train step, or the tokenizer's
  encoders and decoders) for ``config``, built afresh."""
  from vqvdm_jax.training import diffusion_trainer, token_trainer, vqgan_trainer

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  spec = jax.ShapeDtypeStruct
  if stage == "vqgan":
    programs = vqgan_trainer.compiled_programs.__wrapped__(config, mesh, None)
    init_args, batch = (), {"video": spec((8, 8, 16, 16, 3), np.uint8)}
    extra = ({},)
  elif stage == "diffusion":
    programs = diffusion_trainer.compiled_programs.__wrapped__(config, (2, 4, 4, 4), mesh)
    init_args = (1.0, np.zeros(4, np.float32), 0)
    batch = {"latent": spec((8, 2, 4, 4, 4), np.float32), "label": spec((8,), np.int32),
             "fps": spec((8,), np.float32)}
    extra = ()
  elif stage == "tokenizer":
    from vqvdm_jax.inference import tokenizer
    programs = tokenizer.compiled_programs.__wrapped__(config)
    variables = tokenizer.abstract_variables(config)
    video = spec((2, 8, 16, 16, 3), np.uint8)
    return tuple(function.lower(variables, argument).as_text() for function, argument in (
        (programs.encode, video), (programs.for_diffusion, video),
        (programs.decode_latents, spec((2, 2, 4, 4, 4), np.float32)),
        (programs.encode_indices, video),
        (programs.decode_indices, spec((2, 2, 4, 4), np.int32))))
  else:
    programs = token_trainer.compiled_programs.__wrapped__(config, mesh)
    init_args = (0,)
    batch = {"codes": spec((8, 2, 4, 4), np.int32), "label": spec((8,), np.int32),
             "fps": spec((8,), np.float32)}
    extra = ()
  return (programs.init.lower(*init_args).as_text(),
          programs.train_step.lower(programs.abstract_state, batch, *extra).as_text())


@pytest.mark.parametrize("stage", ["vqgan", "diffusion", "masked", "tokenizer"])
def test_fields_a_stages_programs_ignore_leave_them_unchanged(stage):
  """Each trainer (and the tokenizer) shares its compiled programs between configs that differ
  only in the fields its `program_ignores` (tokenizer: `PROGRAM_IGNORES`) names; here every
  number and flag there changes, and the lowered programs stay the same text (a field the
  programs read changes it: with all of `diffusion` ignored, the token priors' use_fps changed
  their parameter tree, and this test failed)."""
  from vqvdm_jax.training import diffusion_trainer, token_trainer, vqgan_trainer

  config = load_config("tiny")
  if stage == "masked":
    config.stage2 = "masked"
  from vqvdm_jax.inference import tokenizer
  if stage == "tokenizer":
    ignores = tokenizer.PROGRAM_IGNORES
  else:  # the tiny config's learning rates do not decay: the run's length is ignored too
    ignores = {"vqgan": vqgan_trainer, "diffusion": diffusion_trainer,
               "masked": token_trainer}[stage].program_ignores(config)
    section = {"vqgan": "vqgan", "diffusion": "diffusion", "masked": "transformer"}[stage]
    assert f"{section}.train.num_steps" in ignores
  perturbed = _perturbed(config, ignores)
  assert config_lib.config_key(perturbed) != config_lib.config_key(config)
  assert config_lib.config_key(perturbed, ignores) == config_lib.config_key(config, ignores)
  assert _program_texts(stage, perturbed) == _program_texts(stage, config)
