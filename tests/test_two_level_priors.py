"""The token priors over VQ-VAE-2's two-level tokenizer (Algorithm 2): the autoregressive prior's
order [top; bottom] and its cache, the masked prior's level-by-level decoding and training masks,
and `--mode=train` / `--mode=sample` / loading on the tiny two-level tokenizer."""

import itertools
import json
import math

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
from vqvdm_jax.inference.token_model import TokenModel
from vqvdm_jax.models.transformer import TokenTransformer, digits_to_codes
from vqvdm_jax.priors import autoregressive, masked
from vqvdm_jax.priors import model as prior_model
from vqvdm_jax.row_random import video_keys
from vqvdm_jax.training import vqgan_trainer

# The bottom level: a plain 16-code vocabulary; the top: LFQ-like codes of 3 bits, factorised
# (each level has its own vocabulary and embedding).
VOCAB, TOP_FACTORS, CLASSES = 16, (2, 2, 2), 3
GRID, TOP_GRID = (2, 2, 2), (1, 2, 2)
TOP, BOTTOM = math.prod(TOP_GRID), math.prod(GRID)  # 4 + 8 codes
LENGTH, NULL = TOP + BOTTOM, CLASSES


def _model(causal: bool, decode: bool = False) -> TokenTransformer:
  return TokenTransformer(vocab_size=VOCAB, num_classes=CLASSES, grid=GRID, width=32, depth=1,
                          num_heads=2, mlp_ratio=2.0, causal=causal, decode=decode,
                          top_grid=TOP_GRID, top_vocab_size=8, top_factors=TOP_FACTORS)


def _init(model, seed):
  codes = jnp.zeros((2, LENGTH), jnp.int32)
  init = jax.jit(lambda rng: model.init(rng, codes, jnp.zeros(2, jnp.int32), jnp.ones(2)))
  return init(jax.random.PRNGKey(seed))["params"]


def _codes(seed):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.concatenate([rng.integers(0, 8, (2, TOP)),
                                     rng.integers(0, VOCAB, (2, BOTTOM))], axis=1), jnp.int32)


def _bumped(codes, position, vocab_size):
  """``codes`` with the code at ``position`` (only there) moved to the next one of its level."""
  return codes.at[:, position].set((codes[:, position] + 1) % vocab_size)


LABELS, FPS = jnp.array([0, 2]), jnp.array([8.0, 16.0])


@pytest.fixture(scope="module")
def ar():
  model = _model(True)
  return jax.jit(lambda params, codes, labels: model.apply({"params": params}, codes, labels,
                                                           FPS)), _init(model, 1)


def test_bottom_codes_never_change_earlier_logits_and_top_codes_condition_every_bottom_code(ar):
  forward, params = ar
  codes = _codes(0)
  top, bottom = forward(params, codes, LABELS)
  assert top.shape == (2, TOP, sum(TOP_FACTORS)) and bottom.shape == (2, BOTTOM, VOCAB)
  i = 3  # bottom code 3 (sequence position TOP + 3)
  other_top, other_bottom = forward(params, _bumped(codes, TOP + i, VOCAB), LABELS)
  np.testing.assert_array_equal(other_top, top)  # the top level never sees the bottom
  np.testing.assert_array_equal(other_bottom[:, :i + 1], bottom[:, :i + 1])
  assert not np.allclose(other_bottom[:, i + 1:], bottom[:, i + 1:])
  # Algorithm 2's conditioning: the last top code changes the logits of every bottom code.
  other_top, other_bottom = forward(params, _bumped(codes, TOP - 1, 8), LABELS)
  np.testing.assert_array_equal(other_top, top)
  for position in range(BOTTOM):
    assert not np.allclose(other_bottom[:, position], bottom[:, position])


def test_cached_decoding_gives_the_full_forward_logits_over_both_levels(ar):
  forward, params = ar
  codes = _codes(1)
  full_top, full_bottom = forward(params, codes, LABELS)
  decoder = _model(True, decode=True)

  @jax.jit
  def teacher_forced(params, codes):
    first, variables = decoder.apply({"params": params}, LABELS, FPS, codes[:, :0],
                                     method=TokenTransformer.prefill, mutable=["cache"])
    cache, outputs = variables["cache"], []
    for level, positions in ((0, jnp.arange(TOP)), (1, jnp.arange(TOP, LENGTH - 1))):
      def step(cache, i, level=level):  # x_i of its level in, every level's logits of x_i+1 out
        logits, variables = decoder.apply({"params": params, "cache": cache}, codes[:, i], i,
                                          level, method=TokenTransformer.step,
                                          mutable=["cache"])
        return variables["cache"], logits

      cache, logits = jax.lax.scan(step, cache, positions)
      outputs.append(logits)  # ([n, B, V_top], [n, B, V])
    # A prompt across both levels (all top codes and 3 bottom ones) cached in one pass.
    prompted, _ = decoder.apply({"params": params}, LABELS, FPS, codes[:, :TOP + 3],
                                method=TokenTransformer.prefill, mutable=["cache"])
    return first, outputs, prompted

  first, outputs, prompted = teacher_forced(params, codes)
  (from_top, _), (_, from_bottom) = outputs
  # x_0 from the prefix, x_1..x_TOP-1 from the top steps' top head, then the bottom head.
  top = jnp.concatenate([first[0][None], from_top[:TOP - 1]]).transpose(1, 0, 2)
  bottom = jnp.concatenate([outputs[0][1][TOP - 1:], from_bottom]).transpose(1, 0, 2)
  np.testing.assert_allclose(top, full_top, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(bottom, full_bottom, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(prompted[1], full_bottom[:, 3], atol=1e-5, rtol=1e-5)


def test_guided_greedy_sampling_draws_the_top_then_the_bottom_and_keeps_given_codes(ar):
  """top_k = 1 with guidance 2 through the cached loops equals the argmax of the guided full
  forward pass at every position of both levels; the given codes (2 top ones) stay; a seed
  fixes the codes."""
  forward, params = ar
  prompt, given = _codes(2), 2
  draw = jax.jit(lambda keys: autoregressive.sample(
      _model(True, decode=True), params, LABELS, FPS, keys, null=NULL, guidance_scale=2.0,
      top_k=1, prompt=prompt, num_prompt_codes=given))
  codes = np.asarray(draw(video_keys(0, 0, 2)))
  np.testing.assert_array_equal(codes, draw(video_keys(1, 0, 2)))  # greedy: no randomness
  np.testing.assert_array_equal(codes[:, :given], prompt[:, :given])
  assert codes[:, :TOP].max() < 8 and codes[:, TOP:].max() < VOCAB
  both = [forward(params, jnp.asarray(codes), labels) for labels in (LABELS, jnp.full(2, NULL))]
  top = both[1][0] + 2.0 * (both[0][0] - both[1][0])
  bottom = both[1][1] + 2.0 * (both[0][1] - both[1][1])
  digits = jnp.stack([jnp.argmax(block, -1) for block
                      in prior_model.split_digits(top, TOP_FACTORS)], -1)
  greedy_top = digits_to_codes(digits, TOP_FACTORS)
  np.testing.assert_array_equal(codes[:, given:TOP], greedy_top[:, given:])
  np.testing.assert_array_equal(codes[:, TOP:], np.argmax(bottom, -1))


def test_masked_decoding_fixes_the_top_level_before_the_bottom_and_never_changes_given_codes():
  """N = 3 steps a level, one top code given: steps 0-2 unmask the other 3 top codes on the
  cosine schedule while all 8 bottom codes stay masked; steps 3-5 the bottom with the top fixed."""
  model, num_steps, given = _model(False), 3, 1
  params = _init(model, 2)
  prompt = _codes(3)
  draw = jax.jit(lambda keys: masked.sample(
      model, params, LABELS, FPS, keys, null=NULL, guidance_scale=2.0, num_steps=num_steps,
      prompt=prompt, num_prompt_codes=given, return_history=True))
  codes, history = draw(video_keys(0, 0, 2))
  history = np.asarray(history)  # [2N, B, L]
  assert history.shape == (2 * num_steps, 2, LENGTH)
  is_masked = history == np.asarray(model.mask_tokens)
  top_counts = masked.masked_counts(TOP - given, num_steps).tolist()
  bottom_counts = masked.masked_counts(BOTTOM, num_steps).tolist()
  assert is_masked[:, :, :TOP].sum(-1).tolist() == [[c, c] for c in top_counts + [0] * num_steps]
  assert is_masked[:, :, TOP:].sum(-1).tolist() == [[c, c] for c in [BOTTOM] * num_steps
                                                    + bottom_counts]
  for step in history:
    np.testing.assert_array_equal(step[:, :given], prompt[:, :given])
  for before, after in itertools.pairwise(history):  # a chosen code stays chosen
    chosen = before != np.asarray(model.mask_tokens)
    np.testing.assert_array_equal(after[chosen], before[chosen])
  assert codes[:, :TOP].max() < 8 and codes[:, TOP:].max() < VOCAB
  np.testing.assert_array_equal(codes, draw(video_keys(0, 0, 2))[0])


def test_two_level_training_masks_are_the_states_level_by_level_decoding_meets():
  inputs, loss = jax.jit(masked.two_level_token_mask, static_argnums=(1, 2))(
      jax.random.PRNGKey(0), 256, (TOP, BOTTOM))
  inputs, loss = np.asarray(inputs), np.asarray(loss)
  learns_top = loss[:, :TOP].any(-1)
  assert 0.35 < learns_top.mean() < 0.65
  # Top rows: some top codes masked, the bottom all masked, the loss on the masked top codes.
  np.testing.assert_array_equal(inputs[learns_top, TOP:], True)
  np.testing.assert_array_equal(loss[learns_top], inputs[learns_top] & (np.arange(LENGTH) < TOP))
  # Bottom rows: the top all given, the loss on the masked bottom codes.
  np.testing.assert_array_equal(inputs[~learns_top, :TOP], False)
  np.testing.assert_array_equal(loss[~learns_top], inputs[~learns_top])
  assert loss[~learns_top].any(-1).all()


def test_both_losses_score_each_level_under_its_own_head():
  """The train step's losses over [top; bottom]: the top codes' digits under the top head's
  factorised softmaxes, the bottom codes under the bottom head's, averaged over the sequence
  (autoregressive) or over the masked codes (masked)."""
  rng = np.random.default_rng(4)
  top = rng.normal(size=(2, TOP, sum(TOP_FACTORS))).astype(np.float32)
  bottom = rng.normal(size=(2, BOTTOM, VOCAB)).astype(np.float32)
  codes, mask = np.asarray(_codes(4)), rng.random((2, LENGTH)) < 0.5

  def log_softmax(x):
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  bits = (codes[:, :TOP, None] >> np.arange(3)) & 1  # the top codes' digits
  top_nll = -sum(np.take_along_axis(log_softmax(top[..., 2 * i:2 * i + 2]), bits[..., i:i + 1],
                                    -1)[..., 0] for i in range(3))
  bottom_nll = -np.take_along_axis(log_softmax(bottom), codes[:, TOP:, None], -1)[..., 0]
  nll = np.concatenate([top_nll, bottom_nll], axis=1)  # [B, L]
  factors = _model(True).level_factors
  assert factors == (TOP_FACTORS, (VOCAB,))
  ar_loss, masked_loss = jax.jit(lambda logits, codes, mask: (
      autoregressive.next_token_loss(logits, codes, factors),
      masked.masked_token_loss(logits, codes, mask, factors)))((top, bottom), codes, mask)
  np.testing.assert_allclose(ar_loss, nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(masked_loss, nll[mask].mean(), rtol=1e-5)


def test_what_two_levels_cannot_do_is_a_config_error():
  config = _tiny_two_level("masked")
  config_lib.validate(config)
  config.transformer.sample.num_latent_frames = 3
  with pytest.raises(config_lib.ConfigError, match="num_latent_frames.*two-level"):
    config_lib.validate(config)
  config = _tiny_two_level("autoregressive")
  config.transformer.model.code_factorization = "channels"
  config.vqgan.quantizer.kind = "lfq"
  with pytest.raises(config_lib.ConfigError, match="top level's.*'vq'"):
    config_lib.validate(config)


# ---------------------------------------------------------------- end to end on the tiny config
def _tiny_two_level(stage2: str):
  """configs/tiny.py with VQ-VAE-2's two levels, as tests/test_hierarchy.py sets them: bottom
  codes [2, 4, 4] of 32, top codes [1, 2, 2] of 16."""
  config = load_config("tiny")
  config.vqgan.model.hierarchy.levels = 2
  config.vqgan.model.hierarchy.quantizer.codebook_size = 16
  config.vqgan.model.attention_at_lowest = False
  config.transformer.model.depth = 1  # compiles faster; the two-level paths do not need two
  config.stage2 = stage2
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """`--mode=train` of the autoregressive prior on an untrained two-level tokenizer checkpoint
  at stage 1's last step (the prior needs codes, not good ones)."""
  workdir = tmp_path_factory.mktemp("two_level")
  config = _tiny_two_level("autoregressive")
  trainer = vqgan_trainer.VQGANTrainer(config, workdir, jax.devices()[:1])
  step = config.vqgan.train.num_steps
  data_iterator = pipeline.train_iterator(config.data, config.vqgan.train.batch_size, config.seed)
  trainer.checkpointer.save(step, trainer.initial_state().replace(step=jnp.asarray(step)),
                            data_iterator, force=True)
  trainer.checkpointer.close()
  main_lib.run("train", config, str(workdir))
  return config, workdir


def test_train_mode_caches_both_levels_and_writes_two_level_samples(trained):
  config, workdir = trained
  assert (workdir / "autoregressive" / "checkpoints" / "3").exists()
  cache = tokens_lib.TokenCache(tokens_lib.cache_directory(workdir, 4))
  assert cache.latents.shape == (config.data.num_train_clips, 4 + 32)  # [top; bottom]
  codes = cache.latents[:]
  assert codes[:, :4].max() < 16 and codes[:, 4:].max() < 32
  info = json.loads((workdir / "samples" / "000" / "samples.json").read_text())
  assert info["prior"] == "autoregressive" and info["labels"] == [0, 1, 2, 3]
  with (workdir / "samples" / "000" / "videos.npz").open("rb") as file:
    assert np.load(file)["videos"].shape == (4, 8, 16, 16, 3)


def test_a_loaded_two_level_prior_samples_the_same_videos_for_a_seed(trained, tmp_path):
  """What `--mode=sample` does (load, then write samples) gives the training run's samples; the
  codes are both levels' grids, and the videos their decoding."""
  _, workdir = trained
  model = model_lib.load(workdir)
  assert isinstance(model, TokenModel) and model.step == 3
  with (model.write_samples(tmp_path) / "videos.npz").open("rb") as file:
    written = np.load(file)["videos"]
  with (workdir / "samples" / "000" / "videos.npz").open("rb") as file:
    np.testing.assert_array_equal(written, np.load(file)["videos"])
  # The same sampler and decoder again (compiled once per model): samples.json's labels and fps.
  codes = next(model.sample_codes(np.arange(4), np.full(4, 16.0, np.float32), 0))
  assert codes["top"].shape == (4, 1, 2, 2) and codes["bottom"].shape == (4, 2, 4, 4)
  np.testing.assert_array_equal(model.tokenizer.decode(codes), written)
