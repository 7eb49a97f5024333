"""Properties of the quantizers: VQ-VDM eq. 2, the VQ-VAE-2 EMA update and MAGVIT-v2 LFQ."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import unfreeze

from vqvdm_jax.config import base_config
from vqvdm_jax.models import quantizers as q

CODEBOOK = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], np.float32)  # [K=4, c=2]


def _init(module, z):
  return unfreeze(jax.jit(module.init)({"params": jax.random.key(0)}, z))


def _jit_apply(module, **kwargs):
  """``module.apply`` with ``kwargs``, jitted: one compile instead of one per op."""
  return jax.jit(functools.partial(module.apply, **kwargs))


def _with_codebook(module, variables, codebook):
  """Variables with a hand-made codebook in whichever collection the kind keeps it."""
  codebook = jnp.asarray(codebook)
  if isinstance(module, q.VectorQuantizer):
    variables["params"]["codebook"] = codebook
  else:
    variables["quantizer_state"]["codebook"] = codebook
    variables["quantizer_state"]["embed_sum"] = codebook
  return variables


def _hand_made(kind, **kwargs):
  cls = {"vq": q.VectorQuantizer, "ema": q.EMAVectorQuantizer}[kind]
  module = cls(codebook_size=4, code_dim=2, **kwargs)
  z = jnp.zeros((3, 2), jnp.float32)
  return module, _with_codebook(module, _init(module, z), CODEBOOK)


def _config_quantizer(kind, **overrides):
  config = base_config().vqgan.quantizer
  config.kind = kind
  config.codebook_size = 8
  for field, value in overrides.items():
    config[field] = value
  return q.make_quantizer(config, latent_channels=3)


@pytest.mark.parametrize("kind", ["vq", "ema"])
def test_nearest_code_is_chosen(kind):
  module, variables = _hand_made(kind)
  z = jnp.array([[0.9, 0.2], [0.1, -0.3], [0.2, 0.8], [4.0, 6.0], [0.6, 0.45]], jnp.float32)
  out = _jit_apply(module)(variables, z)
  np.testing.assert_array_equal(out.indices, [1, 0, 2, 3, 1])
  np.testing.assert_array_equal(out.quantized, CODEBOOK[[1, 0, 2, 3, 1]])
  assert out.indices.dtype == jnp.int32


@pytest.mark.parametrize("kind", ["vq", "ema", "lfq"])
def test_straight_through_gradient_flows_to_z(kind):
  module = _config_quantizer(kind)
  z = jax.random.normal(jax.random.key(1), (2, 3, 3), jnp.float32)
  w = jax.random.normal(jax.random.key(2), z.shape, jnp.float32)
  variables = _init(module, z)

  grad = jax.jit(jax.grad(lambda z: jnp.sum(module.apply(variables, z).quantized * w)))(z)
  np.testing.assert_allclose(grad, w, rtol=1e-6)


def test_vq_loss_equals_codebook_plus_quarter_commitment():
  module, variables = _hand_made("vq", beta=0.25)
  z = jnp.array([[0.9, 0.2], [0.1, -0.3]], jnp.float32)  # nearest codes [1, 0] and [0, 0]
  squared_error = np.mean(np.array([0.1, 0.2, 0.1, 0.3]) ** 2)  # |z - e| per element
  out = _jit_apply(module)(variables, z)
  np.testing.assert_allclose(out.terms["codebook"], squared_error, rtol=1e-5)
  np.testing.assert_allclose(out.terms["commitment"], squared_error, rtol=1e-5)
  np.testing.assert_allclose(out.loss, 1.25 * squared_error, rtol=1e-5)

  # Stop-gradients in the right places: z feels only β·commitment, the codebook only its loss.
  def loss(params, z):
    return module.apply({**variables, "params": params}, z).loss

  grad_params, grad_z = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], z)
  e = CODEBOOK[[1, 0]]
  np.testing.assert_allclose(grad_z, 0.25 * 2 * (z - e) / z.size, rtol=1e-5)
  expected_codebook_grad = np.zeros_like(CODEBOOK)
  expected_codebook_grad[[1, 0]] = 2 * (e - z) / z.size
  np.testing.assert_allclose(grad_params["codebook"], expected_codebook_grad, rtol=1e-5, atol=1e-7)


def test_ema_codebook_update_matches_formula():
  decay, epsilon = 0.9, 0.1
  cluster_size = np.array([2.0, 1.0, 0.5])
  embed_sum = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  z = np.array([[1.0, 2.0], [3.0, 4.0], [-1.0, 0.0]])
  assignment = [0, 0, 1]  # code 2 gets nothing
  one_hot = np.eye(3)[assignment]
  # By hand: n = [2, 1, 0], sums = [[4, 6], [-1, 0], [0, 0]].
  expected_size = np.array([0.9 * 2 + 0.1 * 2, 0.9 * 1 + 0.1 * 1, 0.9 * 0.5 + 0.1 * 0])
  expected_sum = np.array([[0.9 * 2 + 0.1 * 4, 0.1 * 6], [0.1 * -1, 0.9], [0.9, 0.9]])
  total = expected_size.sum()  # 2 + 1 + 0.45
  smoothed = (expected_size + epsilon) / (total + 3 * epsilon) * total
  update = jax.jit(q.ema_codebook_update, static_argnums=(4, 5))
  new_size, new_sum, codebook = update(
      jnp.asarray(cluster_size, jnp.float32), jnp.asarray(embed_sum, jnp.float32),
      jnp.asarray(z, jnp.float32), jnp.asarray(one_hot, jnp.float32), decay, epsilon)
  np.testing.assert_allclose(new_size, [2.0, 1.0, 0.45], rtol=1e-6)
  np.testing.assert_allclose(new_size, expected_size, rtol=1e-6)
  np.testing.assert_allclose(new_sum, expected_sum, rtol=1e-6)
  np.testing.assert_allclose(codebook, expected_sum / smoothed[:, None], rtol=1e-6)


def test_ema_state_changes_only_when_train():
  module, variables = _hand_made("ema")
  z = jnp.array([[0.9, 0.2], [0.1, -0.3], [0.2, 0.8]], jnp.float32)
  before = variables["quantizer_state"]

  _, frozen = _jit_apply(module, train=False, mutable=["quantizer_state"])(variables, z)
  jax.tree.map(np.testing.assert_array_equal, frozen["quantizer_state"], before)

  _, updated = _jit_apply(module, train=True, mutable=["quantizer_state"])(variables, z)
  state = updated["quantizer_state"]
  for name in ("codebook", "cluster_size", "embed_sum", "last_used_step"):
    assert not np.array_equal(state[name], before[name]), name
  assert int(state["step"]) == 1
  # Unused code: e = γm / Ñ with Ñ ≈ γN (Laplace smoothing moves it by ~ε).
  np.testing.assert_allclose(state["codebook"][3], CODEBOOK[3], rtol=1e-5)


def test_lfq_index_code_round_trip_for_all_codes():
  module = q.LookupFreeQuantizer(code_dim=4)
  indices = jnp.arange(16, dtype=jnp.int32)
  variables = _init(module, jnp.zeros((1, 4)))
  codes = np.asarray(_jit_apply(module, method="codes_from_indices")(variables, indices))
  assert codes.shape == (16, 4)
  assert len({tuple(row) for row in codes}) == 16
  assert set(np.unique(codes)) == {-1.0, 1.0}
  apply = _jit_apply(module)
  out = apply(variables, 0.3 * codes)
  np.testing.assert_array_equal(out.indices, indices)
  np.testing.assert_array_equal(out.quantized, codes)
  # Bit i of the index is channel i; z = 0 is the -1 side (1[z_i > 0] = 0).
  np.testing.assert_array_equal(codes[2], [-1, 1, -1, -1])
  out = apply(variables, jnp.array([[0.0, 0.5, 0.0, -0.5]]))
  np.testing.assert_array_equal(out.indices, [2])
  np.testing.assert_array_equal(out.quantized, [[-1, 1, -1, -1]])


def test_lfq_entropy_penalty_nonpositive_and_zero_for_identical_tokens():
  z = jax.random.normal(jax.random.key(3), (64, 4), jnp.float32)
  penalty = jax.jit(q.lfq_entropy_penalty, static_argnums=1)
  assert float(penalty(z, 0.5)) <= 1e-6
  assert float(penalty(z, 0.01)) <= 1e-6
  identical = np.tile(np.asarray(z)[:1], (64, 1))
  np.testing.assert_allclose(penalty(identical, 0.5), 0.0, atol=1e-5)


def test_lfq_entropy_penalty_more_negative_for_confident_diverse_tokens():
  temperature = 0.1

  @jax.jit  # One compile instead of one per op.
  def penalties():
    all_codes = q.lfq_codes_from_indices(jnp.arange(16), 4)
    confident_diverse = 2.0 * jnp.tile(all_codes, (4, 1))  # every code, far from the boundaries
    uncertain = 0.01 * jax.random.normal(jax.random.key(4), (64, 4))  # near the origin
    collapsed = 2.0 * jnp.tile(all_codes[:1], (64, 1))  # confident, one code
    return {name: q.lfq_entropy_penalty(z, temperature) for name, z in
            [("diverse", confident_diverse), ("uncertain", uncertain), ("collapsed", collapsed)]}

  penalty = {name: float(value) for name, value in penalties().items()}
  np.testing.assert_allclose(penalty["diverse"], -np.log(16), rtol=1e-4)  # 0 - log 2^d
  assert penalty["diverse"] < penalty["uncertain"] - 1.0
  assert penalty["diverse"] < penalty["collapsed"] - 1.0


def test_entropy_weight_annealed_linearly_by_quantizer_step():
  schedule = q.entropy_weight_schedule
  np.testing.assert_allclose(schedule(0, 0.1, 0.0, 10), 0.1)
  np.testing.assert_allclose(schedule(5, 0.1, 0.0, 10), 0.05, rtol=1e-6)
  np.testing.assert_allclose(schedule(10, 0.1, 0.0, 10), 0.0, atol=1e-8)
  np.testing.assert_allclose(schedule(50, 0.1, 0.0, 10), 0.0, atol=1e-8)
  np.testing.assert_allclose(schedule(7, 0.1, 0.5, 0), 0.1)  # 0 steps: no annealing

  module = _config_quantizer("lfq", entropy_weight=0.4, entropy_weight_final=0.0,
                             entropy_anneal_steps=4)
  z = jax.random.normal(jax.random.key(5), (8, 3))
  variables = _init(module, z)
  weights = []
  apply = _jit_apply(module, train=True, mutable=["quantizer_state"])
  for _ in range(3):
    out, updates = apply(variables, z)
    variables = {**variables, **updates}
    weights.append(float(out.terms["entropy_weight"]))
  np.testing.assert_allclose(weights, [0.4, 0.3, 0.2], rtol=1e-6)
  expected = 0.25 * out.terms["commitment"] + 0.2 * out.terms["entropy_penalty"]
  np.testing.assert_allclose(out.loss, expected, rtol=1e-6)


@pytest.mark.parametrize("kind", ["vq", "ema"])
def test_dead_code_restart_reseeds_never_used_code_with_batch_vector(kind):
  module, variables = _hand_made(kind, dead_code_restart=True, dead_code_steps=2)
  z = jnp.array([[0.9, 0.2], [0.1, -0.3], [0.2, 0.8]], jnp.float32)  # code 3 is never chosen

  @jax.jit  # One compile instead of one per op.
  def train_step(variables, key):
    _, updates = module.apply(variables, z, train=True, mutable=["quantizer_state"],
                              rngs={"quantizer": key})
    variables = {**variables, **updates}
    return variables, module.apply(variables, jnp.arange(4), method="codes_from_indices")

  variables, codes = train_step(variables, jax.random.key(0))  # step 0: code 3 idle for 1 step < 2
  np.testing.assert_allclose(codes[3], CODEBOOK[3], rtol=1e-5)  # not restarted yet
  variables, codes = train_step(variables, jax.random.key(1))  # step 1: idle 2 steps: restart
  codes = np.asarray(codes)
  assert any(np.allclose(codes[3], row, atol=1e-6) for row in np.asarray(z)), codes[3]
  state = variables["quantizer_state"]
  np.testing.assert_array_equal(state["last_used_step"], [1, 1, 1, 1])
  if kind == "vq":  # the used codes are untouched: only the restarted row has an offset
    np.testing.assert_array_equal(codes[:3], CODEBOOK[:3])
  # The restarted code now wins the token it was seeded from.
  out = _jit_apply(module)(variables, codes[3][None])
  assert int(out.indices[0]) == 3


def test_usage_counts_codes_used_within_window():
  module, variables = _hand_made("vq", usage_window=2)
  batches = [jnp.array([[0.0, 0.1]]), jnp.array([[0.9, 0.0]]), jnp.array([[0.1, 0.9]])]
  usage = []
  apply = _jit_apply(module, train=True, mutable=["quantizer_state"])
  for z in batches:  # codes 0, 1, 2 at steps 0, 1, 2
    out, updates = apply(variables, z)
    variables = {**variables, **updates}
    usage.append(float(out.stats["usage"]))
  # Step 0: {0}; step 1: {0, 1}; step 2: {1, 2} (code 0 is 2 steps old); code 3 never.
  np.testing.assert_allclose(usage, [0.25, 0.5, 0.5])
  np.testing.assert_array_equal(variables["quantizer_state"]["last_used_step"][:3], [0, 1, 2])
  assert out.stats["usage"].dtype == jnp.float32


def test_perplexity_is_exp_entropy_of_batch_histogram():
  module, variables = _hand_made("vq")
  apply = _jit_apply(module)
  z = jnp.array(CODEBOOK[[0, 1, 2, 3, 0, 1, 2, 3]])
  np.testing.assert_allclose(apply(variables, z).stats["perplexity"], 4.0, rtol=1e-6)
  z = jnp.array(CODEBOOK[[0, 0, 0, 1]])
  probs = np.array([0.75, 0.25])
  expected = np.exp(-np.sum(probs * np.log(probs)))
  np.testing.assert_allclose(apply(variables, z).stats["perplexity"], expected, rtol=1e-6)


@pytest.mark.parametrize("kind", ["vq", "ema", "lfq"])
def test_works_under_jit_with_video_latent_shape(kind):
  module = _config_quantizer(kind, dead_code_restart=True, dead_code_steps=1)
  z = jax.random.normal(jax.random.key(6), (2, 2, 3, 3, 3), jnp.float32)  # [B, t, h, w, c]
  variables = _init(module, z)

  @jax.jit
  def train_step(variables, z, key):
    def loss_fn(params):
      out, updates = module.apply({**variables, "params": params}, z, train=True,
                                  mutable=["quantizer_state"], rngs={"quantizer": key})
      return out.loss, (out, updates)

    grads, (out, updates) = jax.grad(loss_fn, has_aux=True)(variables.get("params", {}))
    return grads, out, {**variables, **updates}

  grads, out, new_variables = train_step(variables, z, jax.random.key(7))
  assert out.quantized.shape == z.shape and out.indices.shape == z.shape[:-1]
  assert out.indices.dtype == jnp.int32 and out.loss.shape == ()
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(grads))
  assert int(new_variables["quantizer_state"]["step"]) == 1
  codes = module.apply(new_variables, out.indices, method="codes_from_indices")
  if kind != "ema":  # ema's codebook has moved since quantizing; vq's used rows have not
    np.testing.assert_allclose(codes, out.quantized, rtol=1e-6)
  evaluated = jax.jit(lambda v, z: module.apply(v, z))(new_variables, z)
  assert evaluated.stats["perplexity"].dtype == jnp.float32


# ---------------------------------------------------------------- FSQ (Mentzer et al. 2023)

FSQ_LEVELS = (8, 5, 3, 2)  # even and odd counts; 240 codes


def test_fsq_has_the_product_of_its_levels_as_codes():
  module = q.FiniteScalarQuantizer(levels=FSQ_LEVELS)
  assert module.num_codes == 8 * 5 * 3 * 2
  config = base_config().vqgan.quantizer
  config.kind, config.fsq_levels = "fsq", FSQ_LEVELS
  assert q.num_codes(config, latent_channels=4) == 240
  # Dense random latents land on every one of the 240 codes, and on nothing else.
  z = 3.0 * jax.random.normal(jax.random.key(0), (20_000, 4), jnp.float32)
  variables = _init(module, z)
  out = _jit_apply(module)(variables, z)
  assert set(np.unique(out.indices).tolist()) == set(range(240))


def test_fsq_index_to_code_round_trip_for_every_code():
  indices = jnp.arange(math.prod(FSQ_LEVELS))

  @jax.jit  # One compile instead of one per op.
  def codes_and_indices(indices):
    codes = q.fsq_codes_from_indices(indices, FSQ_LEVELS)
    return codes, q.fsq_indices(codes, FSQ_LEVELS)

  codes, round_trip = codes_and_indices(indices)  # [240, 4], [240]
  np.testing.assert_array_equal(round_trip, indices)
  codes = np.asarray(codes)
  assert len({tuple(c) for c in codes.tolist()}) == 240  # a bijection
  assert float(np.min(codes)) == -1.0 and float(np.max(codes)) == 1.0
  # The module maps a latent inside each code's rounding cell to that code: invert the bound
  # f(z) = tanh(z + tan(o / h)) h - o at a point 0.3 from the integer level, towards the middle.
  module = q.FiniteScalarQuantizer(levels=FSQ_LEVELS)
  variables = _init(module, codes)
  half = np.array([level // 2 for level in FSQ_LEVELS], np.float64)
  scaled = codes.astype(np.float64) * half  # integer levels
  levels = np.array(FSQ_LEVELS, np.float64)
  h = (levels - 1) * (1 - 1e-3) / 2
  offset = np.where(np.array(FSQ_LEVELS) % 2 == 0, 0.5, 0.0)
  target = scaled + 0.3 * np.sign(-offset - scaled)
  preimage = np.arctanh((target + offset) / h) - np.tan(offset / h)
  out = _jit_apply(module)(variables, jnp.asarray(preimage, jnp.float32))
  np.testing.assert_array_equal(out.indices, indices)
  np.testing.assert_allclose(out.quantized, codes, atol=1e-6)
  np.testing.assert_allclose(
      _jit_apply(module, method="codes_from_indices")(variables, out.indices), codes)


def test_fsq_gradient_is_straight_through_the_rounding():
  levels = (8, 5)
  z = jax.random.normal(jax.random.key(3), (6, 2), jnp.float32)
  w = jax.random.normal(jax.random.key(4), z.shape, jnp.float32)
  grad = jax.jit(jax.grad(lambda z: jnp.sum(w * q.fsq_quantize(z, levels))))(z)
  # Expected: d/dz of the bound alone (rounding is the identity backwards), over ⌊L/2⌋.
  bound_grad = jax.jit(jax.grad(lambda z: jnp.sum(w * q.fsq_bound(z, levels)
                                                  / jnp.array([4.0, 2.0]))))(z)
  np.testing.assert_allclose(grad, bound_grad, rtol=1e-6)
  assert np.all(np.abs(np.asarray(grad)) > 0)
  # And through the module, as the trainer calls it.
  module = q.FiniteScalarQuantizer(levels=levels)
  variables = _init(module, z)
  module_grad = jax.jit(jax.grad(lambda z: jnp.sum(w * module.apply(variables, z).quantized)))(z)
  np.testing.assert_allclose(module_grad, grad, rtol=1e-6)


def test_fsq_tracks_usage_and_perplexity_when_training():
  module = q.FiniteScalarQuantizer(levels=(3, 3), usage_window=10)
  z = jnp.array([[-5.0, -5.0], [5.0, 5.0], [0.0, 0.0], [0.0, 0.0]], jnp.float32)
  variables = _init(module, z)
  out, updates = _jit_apply(module, train=True, mutable=["quantizer_state"])(variables, z)
  np.testing.assert_array_equal(out.indices, [0, 8, 4, 4])
  assert float(out.stats["usage"]) == pytest.approx(3 / 9)
  # Histogram 1/4, 1/4, 1/2: perplexity exp(H) = exp(1.5 ln 2) = 2^1.5.
  assert float(out.stats["perplexity"]) == pytest.approx(2**1.5, rel=1e-5)
  assert int(updates["quantizer_state"]["step"]) == 1
  assert float(out.loss) == 0.0


def test_fsq_levels_must_match_the_latent_channels():
  config = base_config().vqgan.quantizer
  config.kind, config.fsq_levels = "fsq", (8, 5, 5)
  with pytest.raises(ValueError, match="fsq_levels.*latent_channels=4"):
    q.make_quantizer(config, latent_channels=4)


def test_fsq_snaps_a_code_space_latent_to_its_nearest_code():
  """Stage-2 samples live in code space: a code comes back unchanged (``__call__`` would bound
  it again and move it), a perturbed one comes back to its code, and outliers are clipped."""
  module = q.FiniteScalarQuantizer(levels=FSQ_LEVELS)
  codes = jax.jit(q.fsq_codes_from_indices, static_argnums=1)(jnp.arange(240), FSQ_LEVELS)
  variables = _init(module, codes)
  nearest_codes = _jit_apply(module, method="nearest_codes")
  np.testing.assert_array_equal(nearest_codes(variables, codes), codes)
  half_cell = 0.4 / np.array([level // 2 for level in FSQ_LEVELS], np.float32)
  noise = jax.random.uniform(jax.random.key(5), codes.shape, minval=-1.0, maxval=1.0) * half_cell
  np.testing.assert_allclose(nearest_codes(variables, codes + noise), codes, atol=1e-6)
  far = nearest_codes(variables, jnp.full((1, 4), 9.0))
  np.testing.assert_allclose(far, [[0.75, 1.0, 1.0, 0.0]])  # tops: 3/4, 2/2, 1/1, 0/1


@pytest.mark.parametrize("kind", ["vq", "ema", "lfq"])
def test_nearest_codes_equals_quantize_for_table_and_sign_quantizers(kind):
  module = _config_quantizer(kind)
  z = jax.random.normal(jax.random.key(6), (2, 5, 3), jnp.float32)
  variables = _init(module, z)
  np.testing.assert_array_equal(_jit_apply(module, method="nearest_codes")(variables, z),
                                _jit_apply(module)(variables, z).quantized)
