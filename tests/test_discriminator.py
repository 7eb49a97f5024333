"""The light 3D discriminator: downsampling at every layer, features for feature matching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvdm_jax.models.discriminator import Discriminator3D


def _output_shapes(model, video_shape):
  """Shapes of (logits, features) without compiling anything (initialisers compile slowly)."""
  video = jax.ShapeDtypeStruct(video_shape, jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), video)
  logits, features = jax.eval_shape(model.apply, params, video)
  return logits, features


@pytest.fixture(scope="module")
def small_discriminator():
  # Two groups of four channels: a one-channel group has zero variance on a flat video, and
  # GroupNorm would then amplify rounding noise by 1/sqrt(epsilon).
  model = Discriminator3D(channels=4, num_layers=2, num_groups=2, conv_impl="native")
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4, 16, 16, 3)))
  return model, params


def test_discriminator_halves_time_and_space_at_every_layer():
  logits, features = _output_shapes(Discriminator3D(channels=4, num_layers=3), (2, 8, 16, 16, 3))
  assert len(features) == 3
  assert [f.shape for f in features] == [(2, 4, 8, 8, 4), (2, 2, 4, 4, 8), (2, 1, 2, 2, 16)]
  assert logits.shape == (2, 1, 2, 2, 1)
  assert logits.dtype == jnp.float32


def test_discriminator_keeps_a_single_frame_axis():
  logits, features = _output_shapes(Discriminator3D(channels=4, num_layers=2), (1, 1, 16, 16, 3))
  assert [f.shape[1:4] for f in features] == [(1, 8, 8), (1, 4, 4)]
  assert logits.shape == (1, 1, 4, 4, 1)


def test_discriminator_channels_double_and_cap_at_eight_times():
  _, features = _output_shapes(Discriminator3D(channels=2, num_layers=5), (1, 2, 32, 32, 3))
  assert [f.shape[-1] for f in features] == [2, 4, 8, 16, 16]
  assert [f.shape[2] for f in features] == [16, 8, 4, 2, 1]


def test_discriminator_sees_a_constant_video_as_constant_everywhere(small_discriminator):
  # Replicate padding: no border artefacts, so every patch of a flat video gets the same logit.
  # (Zero padding would make border patches differ.)
  model, params = small_discriminator
  logits, features = jax.jit(model.apply)(params, jnp.full((1, 4, 16, 16, 3), 0.7))
  for h in [*features, logits]:
    h = np.asarray(h)
    np.testing.assert_allclose(h, np.broadcast_to(h[:, :1, :1, :1], h.shape), atol=1e-5)


def test_discriminator_conv_impls_agree(small_discriminator):
  model, params = small_discriminator
  video = jax.random.uniform(jax.random.key(2), (1, 4, 16, 16, 3), minval=-1, maxval=1)
  reference, _ = jax.jit(model.apply)(params, video)
  logits, _ = jax.jit(model.clone(conv_impl="taps").apply)(params, video)
  np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-5)


def test_discriminator_features_carry_gradient_to_the_input(small_discriminator):
  model, params = small_discriminator
  video = jax.random.uniform(jax.random.key(3), (1, 4, 16, 16, 3), minval=-1, maxval=1)
  grad = jax.jit(jax.grad(lambda p, v: jnp.sum(model.apply(p, v)[1][-1] ** 2), argnums=1))(
      params, video)
  assert np.any(np.asarray(grad) != 0.0)
