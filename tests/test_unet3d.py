"""The spatio-temporal 3D U-Net: causality of temporal attention, shapes, conditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvdm_jax.models.unet3d import TemporalAttention, UNet3D, timestep_embedding

LATENT_SHAPE = (2, 4, 8, 8, 4)  # [B, T, H, W, C]


def init_key(seed: int) -> jax.Array:
  # 'rbg' keys: on XLA:CPU, compiling many partitionable-threefry draws (one per parameter)
  # takes minutes; rbg compiles in seconds. Only the initial values differ.
  return jax.random.key(seed, impl="rbg")


def normal(seed: int, shape) -> jax.Array:
  """Test inputs from numpy: no RNG computation to compile (nor the program jnp.asarray compiles
  for each shape)."""
  return jax.device_put(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def small_unet(**overrides) -> UNet3D:
  fields = dict(channels=8, channel_multipliers=(1, 2), num_res_blocks=1, attention_levels=(1,),
                num_heads=2, num_groups=4, num_classes=3, use_fps=True)
  fields.update(overrides)
  return UNet3D(**fields)


@pytest.fixture(scope="module")
def conditional_unet():
  model = small_unet()
  z = normal(0, LATENT_SHAPE)
  params = jax.jit(model.init)(init_key(1), z, jnp.array([3, 700]), jnp.array([8.0, 29.97]),
                               jnp.array([0, 2]))
  return model, params, z


@pytest.fixture(scope="module")
def conditional_apply(conditional_unet):
  """The conditional U-Net's jitted apply: the tests that call it on the same shapes share one
  compile (a new ``jax.jit(model.apply)`` of each test compiles again)."""
  return jax.jit(conditional_unet[0].apply)


def test_causal_temporal_attention_ignores_future_frames():
  # Jitted init and numpy edits: eager, each op compiles a program of its own.
  x = np.asarray(normal(0, (2, 5, 3, 3, 8)))
  attention = TemporalAttention(num_heads=2, num_groups=4)
  params = jax.jit(attention.init)(init_key(1), x)
  apply = jax.jit(attention.apply)
  base = np.asarray(apply(params, x))
  for frame in (1, 3):
    # Random, not constant: a per-frame GroupNorm would erase a constant shift of one frame.
    bump = np.asarray(normal(frame, x[:, frame].shape))
    bumped = x.copy()
    bumped[:, frame] += bump
    perturbed = np.asarray(apply(params, bumped))
    np.testing.assert_allclose(perturbed[:, :frame], base[:, :frame], atol=1e-6)
    changes = np.abs(perturbed - base).max(axis=(0, 2, 3, 4))
    assert np.all(changes[frame:] > 1e-4), changes


# Jitted: eager, each op of the embedding compiles a program of its own.
jitted_timestep_embedding = jax.jit(timestep_embedding, static_argnums=(1, 2))


def test_timestep_embedding_shape_and_range():
  embedding = jitted_timestep_embedding(jnp.array([0, 10, 999]), 9)
  assert embedding.shape == (3, 9)
  assert float(np.abs(np.asarray(embedding)).max()) <= 1.0


def sinusoidal_embedding_64(values, dim: int, max_period: float) -> np.ndarray:
  """ADM's encoding in float64: [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (dim // 2)),
  i < dim // 2, then one zero column if dim is odd."""
  values = np.asarray(values, np.float64)
  half = dim // 2
  angles = values[:, None] * max_period ** (-np.arange(half) / half)[None, :]
  return np.concatenate([np.cos(angles), np.sin(angles), np.zeros((len(values), dim % 2))],
                        axis=1)


def test_timestep_embedding_is_cos_then_sin_of_geometric_frequencies():
  values = [0, 1, 7, 250, 999, 29.97]  # timesteps, and a fractional frame rate
  for dim, max_period in ((8, 10000.0), (9, 10000.0), (6, 100.0)):
    got = jitted_timestep_embedding(np.asarray(values, np.float32), dim, max_period)
    np.testing.assert_allclose(got, sinusoidal_embedding_64(values, dim, max_period), atol=1e-4,
                               err_msg=f"dim={dim}, max_period={max_period}")
  # The default period is Vaswani et al.'s 10000.
  np.testing.assert_array_equal(jitted_timestep_embedding(np.asarray(values, np.float32), 8),
                                jitted_timestep_embedding(np.asarray(values, np.float32), 8,
                                                          10000.0))


def test_unet_output_shape_equals_input_with_class_and_fps(conditional_unet, conditional_apply):
  _, params, z = conditional_unet
  out = conditional_apply(params, z, jnp.array([3, 700]), jnp.array([8.0, 29.97]),
                          jnp.array([0, 2]))
  assert out.shape == z.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))


def test_unet_output_shape_equals_input_without_conditioning():
  model = small_unet(num_classes=0, use_fps=False, attention_levels=(0, 1))
  z = normal(0, LATENT_SHAPE)
  t = jnp.array([1.0, 500.0])  # float timesteps are accepted too.
  # Parameters from numpy on the traced shapes: the init compiles ~6x longer than the apply.
  shapes = jax.eval_shape(model.init, init_key(1), z, t)
  assert "fps_embedding" not in shapes["params"] and "class_embedding" not in shapes["params"]
  params = moved_off_init(jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes))
  assert jax.jit(model.apply)(params, z, t).shape == z.shape


def test_class_conditioning_changes_the_output(conditional_unet, conditional_apply):
  _, params, z = conditional_unet
  params = moved_off_init(params)  # no zero-initialised bias may hide the label
  apply = conditional_apply
  t, fps = jnp.array([5, 5]), jnp.array([8.0, 8.0])
  first = np.asarray(apply(params, z, t, fps, jnp.array([0, 0])))
  second = np.asarray(apply(params, z, t, fps, jnp.array([1, 2])))
  null = apply(params, z, t, fps, jnp.array([3, 3]))  # label num_classes is the null label
  unconditional = np.asarray(apply(params, z, t, fps, None))
  assert float(np.abs(first - second).max()) > 1e-4
  assert float(np.abs(first - unconditional).max()) > 1e-4
  np.testing.assert_allclose(unconditional, null, atol=1e-5)


def test_class_embedding_starts_as_strong_as_the_timestep_embedding(conditional_unet):
  # With Flax's default 1/sqrt(width) rows the class was a ~10x weaker signal than the timestep
  # and a short run learned to ignore it; the rows start with unit variance (as torch's).
  _, params, _ = conditional_unet
  rows = np.asarray(params["params"]["class_embedding"]["embedding"])
  assert rows.shape == (4, 32)  # 3 classes + the null label, 4 * channels wide
  np.testing.assert_allclose(rows.std(), 1.0, atol=0.2)


def test_missing_fps_is_an_error(conditional_unet):
  model, params, z = conditional_unet
  with pytest.raises(ValueError, match="use_fps"):  # jitted: raised while tracing, no op compiled
    jax.jit(model.apply)(params, z, jnp.array([1, 1]), None, jnp.array([0, 0]))


def test_remat_keeps_the_parameters_the_output_and_the_gradients(conditional_unet):
  model, params, z = conditional_unet
  remat_model = small_unet(remat=True, dropout=0.0)
  args = (z, jnp.array([3, 700]), jnp.array([8.0, 29.97]), jnp.array([0, 2]))

  def loss(model, params):
    return jnp.mean(model.apply(params, *args, train=True) ** 2)

  assert jax.tree.structure(jax.eval_shape(remat_model.init, init_key(1), *args)) == \
      jax.tree.structure(params)  # same checkpoint layout with remat on or off
  plain_loss, plain_grads = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
  remat_loss, remat_grads = jax.jit(jax.value_and_grad(lambda p: loss(remat_model, p)))(params)
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_scale_shift_norm_reaches_every_residual_block():
  from helpers import load_config

  from vqvdm_jax.diffusion.model import make_unet

  config = load_config("tiny")
  z = jnp.zeros((1, 2, 4, 4, config.vqgan.model.latent_channels))
  fps = jnp.ones((1,)) if config.diffusion.use_fps else None
  labels = jnp.zeros((1,), jnp.int32) if config.diffusion.use_class else None

  def embedding_projections(scale_shift: bool) -> dict:
    config.diffusion.unet.scale_shift_norm = scale_shift
    shapes = jax.eval_shape(make_unet(config).init, init_key(0), z, jnp.zeros((1,), jnp.int32),
                            fps, labels)
    return {jax.tree_util.keystr(path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
            if "res_block" in jax.tree_util.keystr(path) and "Dense_0" in jax.tree_util.keystr(path)
            and jax.tree_util.keystr(path).endswith("['kernel']")}

  added, scale_shift = embedding_projections(False), embedding_projections(True)
  assert len(added) >= 3 and added.keys() == scale_shift.keys()
  for name, (width, features) in added.items():
    assert scale_shift[name] == (width, 2 * features), name


def moved_off_init(params):
  """Every parameter shifted by a little noise, so no zero-initialised bias hides an input.

  In numpy: eager, each add and multiply would compile a program for each shape."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  return jax.device_put(jax.tree_util.tree_unflatten(treedef, [
      np.asarray(leaf) + 0.05 * np.asarray(normal(seed, leaf.shape))
      for seed, leaf in enumerate(leaves)]))


def test_fps_conditioning_changes_the_output_per_sample(conditional_unet, conditional_apply):
  _, params, z = conditional_unet
  params = moved_off_init(params)
  apply = conditional_apply
  t, labels = jnp.array([5, 5]), jnp.array([0, 1])
  slow = np.asarray(apply(params, z, t, jnp.array([8.0, 8.0]), labels))
  fast = np.asarray(apply(params, z, t, jnp.array([30.0, 30.0]), labels))
  assert np.all(np.abs(slow - fast).max(axis=(1, 2, 3, 4)) > 1e-4)
  # Each sample is conditioned on its own frame rate.
  mixed = np.asarray(apply(params, z, t, jnp.array([8.0, 30.0]), labels))
  np.testing.assert_allclose(mixed[0], slow[0], atol=1e-5)
  np.testing.assert_allclose(mixed[1], fast[1], atol=1e-5)


def test_fps_is_ignored_with_use_fps_off():
  # One level and no class: the smallest U-Net that still embeds a timestep (compiles fast).
  model = small_unet(use_fps=False, channel_multipliers=(1,), attention_levels=(), num_classes=0)
  z, t, labels = normal(0, LATENT_SHAPE), jnp.array([5, 5]), None
  # Parameters from numpy on the traced shapes: no init to compile. Given fps, the init
  # still makes no FPS embedding.
  shapes = jax.eval_shape(model.init, init_key(1), z, t, jnp.array([8.0, 8.0]), labels)
  assert "fps_embedding" not in shapes["params"]
  params = moved_off_init(jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes))
  outputs = jax.jit(lambda params: [model.apply(params, z, t, fps, labels) for fps in (
      None, jnp.array([8.0, 8.0]), jnp.array([30.0, 1.0]))])(params)
  for output in outputs[1:]:
    np.testing.assert_array_equal(output, outputs[0])


def attention_blocks(model: UNet3D) -> set[str]:
  shapes = jax.eval_shape(model.init, init_key(0), jnp.zeros(LATENT_SHAPE),
                          jnp.zeros((2,), jnp.int32), jnp.ones((2,)), jnp.zeros((2,), jnp.int32))
  return {name for name, block in shapes["params"].items() if "spatial_attention" in block}


def test_spatial_attention_sits_at_the_configured_levels_and_the_middle():
  assert attention_blocks(small_unet(attention_levels=(1,))) == {
      "down_1_block_0", "middle_block", "up_1_block_0", "up_1_block_1"}
  assert attention_blocks(small_unet(attention_levels=(0,))) == {
      "down_0_block_0", "middle_block", "up_0_block_0", "up_0_block_1"}
  assert attention_blocks(small_unet(attention_levels=())) == {"middle_block"}


def test_zeroing_a_spatial_attention_output_changes_the_unet_output(conditional_unet,
                                                                     conditional_apply):
  _, params, z = conditional_unet
  params = moved_off_init(params)
  apply = conditional_apply
  args = (z, jnp.array([5, 600]), jnp.array([8.0, 8.0]), jnp.array([0, 1]))
  base = np.asarray(apply(params, *args))
  blocks = [name for name, block in params["params"].items() if "spatial_attention" in block]
  assert len(blocks) == 4
  for name in blocks:
    zeroed = jax.tree_util.tree_map(lambda leaf: leaf, params)  # a copy to edit
    projection = zeroed["params"][name]["spatial_attention"]["SelfAttention_0"]["out"]
    zeroed["params"][name]["spatial_attention"]["SelfAttention_0"]["out"] = jax.tree.map(
        np.zeros_like, projection)
    assert float(np.abs(np.asarray(apply(zeroed, *args)) - base).max()) > 1e-4, name
