"""The token priors: causality and the KV cache of the autoregressive transformer, top-k / seed
behaviour of its sampler, MaskGIT's schedule and fixed tokens, guidance on logits, learning."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config

from vqvdm_jax.models.transformer import TokenTransformer
from vqvdm_jax.row_random import video_keys
from vqvdm_jax.priors import autoregressive, masked
from vqvdm_jax.priors import model as prior_model
from vqvdm_jax.training import token_trainer

VOCAB, CLASSES, GRID = 16, 3, (2, 2, 3)  # 12 codes
LENGTH = math.prod(GRID)
NULL = CLASSES


def _model(causal: bool, decode: bool = False, factors: tuple[int, ...] = ()) -> TokenTransformer:
  return TokenTransformer(vocab_size=VOCAB, num_classes=CLASSES, grid=GRID, width=32, depth=2,
                          num_heads=2, mlp_ratio=2.0, causal=causal, decode=decode,
                          factors=factors)


class Jitted:
  """A model whose forward pass is compiled once (eager linen is slow on a shared CPU)."""

  def __init__(self, model):
    self.module, self.mask_token = model, model.mask_token
    self._apply = jax.jit(lambda params, codes, labels, fps: model.apply(
        {"params": params}, codes, labels, fps))

  def apply(self, variables, codes, labels, fps):
    return self._apply(variables["params"], codes, labels, fps)


def _init(model, seed):
  codes = jnp.zeros((2, LENGTH), jnp.int32)
  init = jax.jit(lambda rng: model.init(rng, codes, jnp.zeros(2, jnp.int32), jnp.ones(2)))
  return init(jax.random.PRNGKey(seed))["params"]


@pytest.fixture(scope="module")
def ar():
  codes = jax.random.randint(jax.random.PRNGKey(0), (2, LENGTH), 0, VOCAB)
  labels, fps = jnp.array([0, 2]), jnp.array([8.0, 16.0])
  return Jitted(_model(True)), _init(_model(True), 1), codes, labels, fps


@pytest.fixture(scope="module")
def mlm():
  labels, fps = jnp.array([0, 2]), jnp.array([8.0, 16.0])
  return _model(False), _init(_model(False), 2), labels, fps


def test_changing_code_i_never_changes_the_logits_of_positions_up_to_i(ar):
  model, params, codes, labels, fps = ar
  codes = np.asarray(codes)  # numpy edits and slices: eager jnp compiles a program for each
  logits = np.asarray(model.apply({"params": params}, codes, labels, fps))
  for i in (0, 5, LENGTH - 1):
    changed = codes.copy()
    changed[:, i] = (codes[:, i] + 1) % VOCAB
    other = np.asarray(model.apply({"params": params}, changed, labels, fps))
    np.testing.assert_array_equal(other[:, :i + 1], logits[:, :i + 1])  # p(x_j | x_<j), j <= i
    if i + 1 < LENGTH:
      assert not np.allclose(other[:, i + 1:], logits[:, i + 1:])  # the later ones see it


def test_cached_decoding_gives_the_full_forward_logits_at_every_position(ar):
  model, params, codes, labels, fps = ar
  full = model.apply({"params": params}, codes, labels, fps)
  decoder = _model(True, decode=True)

  @jax.jit
  def teacher_forced(params, codes, labels, fps):
    logits, variables = decoder.apply({"params": params}, labels, fps, codes[:, :0],
                                      method=TokenTransformer.prefill, mutable=["cache"])

    def step(cache, i):
      logits, variables = decoder.apply({"params": params, "cache": cache}, codes[:, i], i,
                                        method=TokenTransformer.step, mutable=["cache"])
      return variables["cache"], logits

    _, later = jax.lax.scan(step, variables["cache"], jnp.arange(LENGTH - 1))
    # A prompt of 5 codes cached in one pass gives x_5's logits.
    prompted, _ = decoder.apply({"params": params}, labels, fps, codes[:, :5],
                                method=TokenTransformer.prefill, mutable=["cache"])
    return jnp.concatenate([logits[:, None], later.transpose(1, 0, 2)], axis=1), prompted

  cached, prompted = teacher_forced(params, codes, labels, fps)
  np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(prompted, full[:, 5], atol=1e-5, rtol=1e-5)


@functools.cache
def _ar_sampler(**settings):
  return jax.jit(lambda params, labels, fps, keys, prompt: autoregressive.sample(
      _model(True, decode=True), params, labels, fps, keys, null=NULL, prompt=prompt, **settings))


def _ar_sample(params, labels, fps, seed, prompt=None, **settings):
  return np.asarray(_ar_sampler(**settings)(params, labels, fps, video_keys(seed, 0, len(labels)),
                                            prompt))


def test_top_k_one_is_greedy_decoding(ar):
  model, params, _, labels, fps = ar
  codes = _ar_sample(params, labels, fps, 0, top_k=1)
  np.testing.assert_array_equal(codes, _ar_sample(params, labels, fps, 1, top_k=1))
  logits = model.apply({"params": params}, codes, labels, fps)
  np.testing.assert_array_equal(codes, np.argmax(logits, axis=-1))  # each the most likely


def test_the_same_seed_gives_the_same_codes_and_given_codes_never_change(ar):
  _, params, _, labels, fps = ar
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, LENGTH)), jnp.int32)
  fixed = 6  # the first latent frame (2 x 3 codes): video continuation
  draw = functools.partial(_ar_sample, params, labels, fps, top_p=0.9, prompt=prompt,
                           num_prompt_codes=fixed)
  first = draw(3)
  np.testing.assert_array_equal(first, draw(3))
  assert not np.array_equal(first, draw(4))
  np.testing.assert_array_equal(first[:, :fixed], prompt[:, :fixed])
  assert not np.array_equal(first[:, fixed:], np.asarray(prompt)[:, fixed:])


def test_a_sliding_window_extends_greedy_decoding_past_the_trained_frames(ar):
  """Five latent frames from a prior trained on two: frame k is the greedy continuation of
  frame k - 1 in a trained-length window (Taming's sliding window, TATS' extension in time)."""
  model, params, _, labels, fps = ar
  greedy = _ar_sampler(top_k=1)
  continue_greedy = _ar_sampler(top_k=1, num_prompt_codes=6)
  keys = video_keys(0, 0, 2)
  first = greedy(params, labels, fps, keys, None).reshape(2, *GRID)
  video = np.asarray(jax.jit(lambda first: prior_model.extend_by_sliding_window(
      lambda window, index: continue_greedy(params, labels, fps, keys, window), first, 5))(first))
  assert video.shape == (2, 5, 2, 3)
  np.testing.assert_array_equal(video[:, :2], first)
  for k in range(2, 5):
    window = video[:, k - 1:k + 1].reshape(2, LENGTH)
    logits = model.apply({"params": params}, window, labels, fps)
    np.testing.assert_array_equal(video[:, k].reshape(2, -1), np.argmax(logits[:, 6:], -1))


def test_factorised_codes_are_the_quantizers_channel_digits():
  """MAGVIT-v2's token factorisation: digit i of an FSQ / LFQ index is latent channel i's level,
  so each digit's softmax is a channel's; log p(code) is the sum of the digits'."""
  from vqvdm_jax.models import quantizers
  from vqvdm_jax.models.transformer import code_digits, digits_to_codes
  levels = (8, 5, 5, 3)

  @jax.jit  # one compile: eager, each op compiles a program of its own
  def compared():
    indices = jnp.arange(math.prod(levels))
    digits = code_digits(indices, levels)
    half = jnp.asarray([level // 2 for level in levels])
    logits = jax.random.normal(jax.random.PRNGKey(0), (3, sum(levels)))
    codes = jnp.array([0, 17, 599])
    blocks = prior_model.split_digits(logits, levels)
    greedy = prior_model.sample_codes(video_keys(0, 0, 3), logits, 0.0, factors=levels)
    return {
        "indices": indices, "digits": digits,
        "fsq_digits": jnp.round(quantizers.fsq_codes_from_indices(indices, levels) * half + half),
        "from_digits": digits_to_codes(digits, levels),
        "bits": code_digits(indices[:16], (2,) * 4),
        "lfq": quantizers.lfq_codes_from_indices(indices[:16], 4),
        "log_p": prior_model.code_log_probability(logits, codes, levels),
        "expected": sum(jax.nn.log_softmax(block)[jnp.arange(3), code_digits(codes, levels)[:, i]]
                        for i, block in enumerate(blocks)),
        "greedy_digits": code_digits(greedy, levels),
        "best_digits": jnp.stack([b.argmax(-1) for b in blocks], axis=-1)}

  got = jax.tree.map(np.asarray, compared())
  np.testing.assert_array_equal(got["fsq_digits"], got["digits"])
  np.testing.assert_array_equal(got["from_digits"], got["indices"])
  np.testing.assert_array_equal(2 * got["bits"] - 1, got["lfq"])
  np.testing.assert_allclose(got["log_p"], got["expected"], rtol=1e-6)
  np.testing.assert_array_equal(got["greedy_digits"], got["best_digits"])


def test_factorised_transformer_is_causal_and_its_cache_matches(ar):
  _, _, codes, labels, fps = ar
  model, decoder = _model(True, factors=(4, 4)), _model(True, decode=True, factors=(4, 4))
  params = _init(model, 3)
  forward = jax.jit(lambda codes: model.apply({"params": params}, codes, labels, fps))
  logits = np.asarray(forward(codes))
  assert logits.shape == (2, LENGTH, 8)  # two digits of 4
  changed_codes = np.array(codes)  # numpy edits and slices: eager jnp compiles a program for each
  changed_codes[:, 5] = (changed_codes[:, 5] + 5) % VOCAB
  changed = np.asarray(forward(changed_codes))
  np.testing.assert_array_equal(changed[:, :6], logits[:, :6])
  assert not np.allclose(changed[:, 6:], logits[:, 6:])
  prompted, _ = jax.jit(lambda: decoder.apply({"params": params}, labels, fps, codes[:, :5],
                                              method=TokenTransformer.prefill,
                                              mutable=["cache"]))()
  np.testing.assert_allclose(prompted, logits[:, 5], atol=1e-5, rtol=1e-5)


def test_filtering_keeps_the_top_k_and_the_nucleus():
  logits = np.log(np.array([[0.5, 0.05, 0.3, 0.15]], np.float32))
  # Jitted: one compile a setting instead of one for each op.
  filter_logits = jax.jit(prior_model.filter_logits, static_argnames=("top_k", "top_p"))
  assert np.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, False, True, False]]
  # 0.5 + 0.3 < 0.85: the nucleus needs the third most likely code too.
  assert np.isfinite(filter_logits(logits, top_p=0.85)).tolist() == [[True, False, True, True]]
  assert np.isfinite(filter_logits(logits, top_p=0.4)).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("prior", ["ar", "mlm"])
def test_guidance_scale_one_is_the_conditional_and_zero_the_unconditional_logits(prior, ar, mlm):
  if prior == "ar":
    model, params, codes, labels, fps = ar
  else:
    model, params, labels, fps = mlm
    model = Jitted(model)
    codes = np.where(np.arange(LENGTH) % 3 == 0, model.mask_token, np.asarray(ar[2]))
  # Jitted guidance arithmetic and numpy inputs: eager, each op compiles a program of its own.
  # One call on the batch and the batch with the null class, as the samplers make it.
  both_labels, both_fps = jax.jit(prior_model.with_null_class, static_argnums=(2, 3))(
      labels, fps, NULL, 0.0)
  assert both_labels.tolist() == [*labels.tolist(), NULL, NULL]
  both = model.apply({"params": params}, np.tile(codes, (2, 1)), both_labels, both_fps)

  conditional = np.asarray(model.apply({"params": params}, codes, labels, fps))
  unconditional = np.asarray(model.apply({"params": params}, codes, np.full_like(labels, NULL),
                                         fps))
  assert not np.allclose(conditional, unconditional)  # the class token matters
  guided_by_1, combined_by_0, combined_by_3 = jax.jit(lambda both: (
      prior_model.guided_logits(*jnp.split(both, 2), 1.0), prior_model.combine_guided(both, 0.0),
      prior_model.combine_guided(both, 3.0)))(both)
  np.testing.assert_allclose(guided_by_1, conditional, atol=1e-5)
  np.testing.assert_allclose(combined_by_0, unconditional, atol=1e-5)
  np.testing.assert_allclose(combined_by_3, unconditional + 3.0 * (conditional - unconditional),
                             atol=1e-4)


def test_masked_decoding_follows_the_schedule_and_never_changes_given_codes(mlm):
  """N = 4 steps over 12 codes of which the first 6 are given: after step s, exactly
  ⌊6 cos(π/2 · (s+1)/4)⌋ codes are still masked, none after the last; the given codes and each
  chosen code stay as they are; the same seed gives the same codes."""
  model, params, labels, fps = mlm
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, LENGTH)), jnp.int32)
  fixed = 6
  draw = jax.jit(lambda keys: masked.sample(
      model, params, labels, fps, keys, null=NULL, guidance_scale=2.0, num_steps=4,
      prompt=prompt, num_prompt_codes=fixed, return_history=True))
  codes, history = draw(video_keys(0, 0, 2))
  history = np.asarray(history)  # [N, B, L]
  counts = masked.masked_counts(LENGTH - fixed, 4)
  assert counts.tolist() == [5, 4, 2, 0]
  assert (history == model.mask_token).sum(-1).tolist() == [[c, c] for c in counts]
  for step in history:
    np.testing.assert_array_equal(step[:, :fixed], prompt[:, :fixed])
  for before, after in itertools.pairwise(history):  # a chosen code stays chosen
    chosen = before != model.mask_token
    np.testing.assert_array_equal(after[chosen], before[chosen])
  assert (history[-1] < VOCAB).all()
  np.testing.assert_array_equal(codes, history[-1])
  np.testing.assert_array_equal(codes, draw(video_keys(0, 0, 2))[0])
  assert not np.array_equal(codes, draw(video_keys(1, 0, 2))[0])


@pytest.mark.parametrize("prior", ["ar", "mlm"])
def test_a_videos_codes_do_not_depend_on_the_other_rows_of_its_batch(prior, ar, mlm):
  """Each row draws from its own key: appending rows (a larger batch, or the padding of a last
  sampling batch) leaves the first rows' codes as they were."""
  # numpy: eager, each slice of a jax array compiles a program of its own
  labels, fps = np.array([0, 2, 1, 1], np.int32), np.array([8.0, 16.0, 8.0, 4.0], np.float32)
  if prior == "ar":
    def draw(batch):
      return _ar_sample(ar[1], labels[:batch], fps[:batch], 3, top_p=0.9)
  else:
    model, params = mlm[:2]
    sample = jax.jit(lambda labels, fps, keys: masked.sample(
        model, params, labels, fps, keys, null=NULL, guidance_scale=2.0, num_steps=4))

    def draw(batch):
      return np.asarray(sample(labels[:batch], fps[:batch], video_keys(3, 0, batch)))
  four = draw(4)
  np.testing.assert_array_equal(draw(2), four[:2])
  assert not np.array_equal(four[2], four[3])  # same class, own keys: other codes


def test_mask_counts_fall_by_the_cosine_and_at_least_one_a_step():
  # ⌊12 cos(π/2 · s/4)⌋ for s = 1..4, and 0 after the last step.
  assert masked.masked_counts(12, 4).tolist() == [11, 8, 4, 0]
  assert masked.masked_counts(3, 12).tolist() == [2, 1] + [0] * 10  # fewer codes than steps
  assert masked.masked_counts(1024, 12)[0] == math.floor(1024 * math.cos(math.pi / 24))


def test_training_masks_follow_the_cosine_ratio():
  mask = np.asarray(jax.jit(masked.random_token_mask, static_argnums=(1, 2))(  # one compile
      jax.random.PRNGKey(0), 4000, 64))
  counts = mask.sum(-1)
  assert counts.min() >= 1 and counts.max() <= 64
  # E[cos(π r / 2)] over r ~ U[0, 1) = 2 / π.
  assert counts.mean() / 64 == pytest.approx(2 / np.pi, abs=0.02)


@pytest.mark.learning
# Factorised (FSQ/LFQ digit) training is covered by the digit, causality and cache tests above;
# a third overfit run cost ~30 s of the suite's budget.
@pytest.mark.parametrize("stage2, quantizer", [("autoregressive", "vq"), ("masked", "vq")])
def test_a_tiny_prior_overfits_a_few_code_sequences(stage2, quantizer, tmp_path):
  """The tiny config's own step, on one device (as the sharded-step test compiles it).
  Measured over 120 steps: mean of the last 10 losses ~0.01 (autoregressive), ~0.5 (masked)."""
  config = load_config("tiny")
  config.stage2 = stage2
  if quantizer == "fsq":  # 1,000 codes as 4 digits (MAGVIT-v2's factorised tokens)
    config.vqgan.quantizer.kind = "fsq"
    config.transformer.model.code_factorization = "channels"
  trainer = token_trainer.TokenTrainer(config, tmp_path, devices=jax.devices()[:1])
  assert len(trainer.model.code_factors) == (4 if quantizer == "fsq" else 1)
  vocab = trainer.model.vocab_size
  sequences = np.random.default_rng(0).integers(0, vocab, (4, 2, 4, 4)).astype(np.int32)
  batch = {"codes": sequences[np.arange(8) % 4], "label": np.arange(8, dtype=np.int32) % 4,
           "fps": np.full(8, 8.0, np.float32)}
  state = trainer.initial_state(0)
  losses = []
  for _ in range(120):
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss/tokens"]))
  trainer.checkpointer.close()
  assert losses[0] > 0.8 * math.log(vocab)
  assert np.mean(losses[-10:]) < 0.25 * math.log(vocab), losses[::10]
