"""The 3D VQGAN tokenizer: shapes, causality, gradients and the MaskGIT tokenizer surface."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from helpers import load_config

from vqvdm_jax import config as config_lib
from vqvdm_jax.models import autoencoder
from vqvdm_jax.models.vqgan import VQGAN3D, latent_shape, make_vqgan


def test_ucf101_latent_is_4_channels_of_4x16x16_for_16x128x128_clips():
  config = load_config("ucf101")
  assert latent_shape(config, batch_size=2) == (2, 4, 16, 16, 4)


@config_lib.per_config(copies=False)
def _jitted_init(config):
  """One jitted init for each config: tests of the same config and video shape share its compile.
  Of a copy, as the model holds the config it was made from and tests edit theirs later."""
  return jax.jit(make_vqgan(config.copy_and_resolve_references()).init)


def _init(config, video):
  # Jitted: one compile of the init costs half of running it op by op (each op compiled alone).
  model = make_vqgan(config)
  variables = _jitted_init(config)({"params": jax.random.PRNGKey(0),
                                    "quantizer": jax.random.PRNGKey(1)}, video)
  return model, variables


def test_reconstruction_has_the_input_shape_and_codes_the_latent_grid():
  config = load_config("tiny")
  video = jax.random.uniform(jax.random.PRNGKey(2), (2, 8, 16, 16, 3), minval=-1, maxval=1)
  model, variables = _init(config, video)
  (x_hat, quantized), indices = jax.jit(lambda variables, video: (  # jitted: as _init
      model.apply(variables, video),
      model.apply(variables, video, method=VQGAN3D.encode_to_indices)))(variables, video)
  assert x_hat.shape == video.shape
  assert quantized.indices.shape == (2, 2, 4, 4)
  np.testing.assert_array_equal(np.asarray(indices), np.asarray(quantized.indices))


def test_decode_from_indices_equals_decoding_the_quantized_latent():
  config = load_config("tiny")
  video = jax.random.uniform(jax.random.PRNGKey(2), (1, 8, 16, 16, 3), minval=-1, maxval=1)
  model, variables = _init(config, video)

  @jax.jit  # as _init
  def reconstruct(variables, video):
    x_hat, quantized = model.apply(variables, video)
    return x_hat, model.apply(variables, quantized.indices, method=VQGAN3D.decode_from_indices)

  x_hat, from_indices = reconstruct(variables, video)
  np.testing.assert_allclose(np.asarray(from_indices), np.asarray(x_hat), atol=1e-5)


def test_straight_through_gradient_reaches_the_encoder():
  config = load_config("tiny")
  video = jax.random.uniform(jax.random.PRNGKey(2), (1, 8, 16, 16, 3), minval=-1, maxval=1)
  model, variables = _init(config, video)

  def reconstruction_error(params):
    x_hat, _ = model.apply({**variables, "params": params}, video)
    return jnp.mean((x_hat - video) ** 2)

  grads = jax.jit(jax.grad(reconstruction_error))(variables["params"])  # jitted: as _init
  encoder_norm = sum(float(np.sum(np.asarray(g) ** 2)) for g in jax.tree.leaves(grads["encoder"]))
  assert encoder_norm > 0.0


def test_causal_tokenizer_code_of_earlier_frames_ignores_later_frames():
  config = load_config("tiny")
  config.vqgan.model.causal = True
  config.vqgan.model.colour_shortcut = True  # the cell means must be causal too
  config.data.num_frames = 9  # 1 + 2 * 4: latent frames cover {0}, {1..4}, {5..8}
  video = jax.random.uniform(jax.random.PRNGKey(3), (1, 9, 16, 16, 3), minval=-1, maxval=1)
  model, variables = _init(config, video)
  # numpy arrays around the one jitted encoder: eager jnp edits and slices compile a program each
  encode = jax.jit(lambda v: model.apply(variables, v, method=VQGAN3D.encode))
  video = np.asarray(video)
  latent = np.asarray(encode(video))
  assert latent.shape[1] == 3
  for frame in (1, 5):
    flipped = video.copy()
    flipped[:, frame] = -video[:, frame]
    changed = np.asarray(encode(flipped))
    first_affected = (frame + 3) // 4  # latent frame j reads video frames <= 4j
    np.testing.assert_array_equal(changed[:, :first_affected], latent[:, :first_affected])
    assert not np.allclose(changed[:, first_affected], latent[:, first_affected])


def test_causal_tokenizer_encodes_and_decodes_single_images():
  config = load_config("tiny")
  config.vqgan.model.causal = True
  config.data.num_frames = 9
  video = jnp.zeros((1, 9, 16, 16, 3))
  model, variables = _init(config, video)
  image = jax.random.uniform(jax.random.PRNGKey(4), (1, 1, 16, 16, 3), minval=-1, maxval=1)
  x_hat, quantized = jax.jit(model.apply)(variables, image)  # jitted: as _init
  assert quantized.indices.shape == (1, 1, 4, 4)
  assert x_hat.shape == image.shape


def test_native_and_taps_convolutions_give_the_same_tokenizer():
  config = load_config("tiny")
  video = jax.random.uniform(jax.random.PRNGKey(5), (1, 8, 16, 16, 3), minval=-1, maxval=1)
  config.vqgan.model.conv_impl = "native"
  model, variables = _init(config, video)
  native = jax.jit(functools.partial(model.apply, method=VQGAN3D.encode))(variables, video)
  config.vqgan.model.conv_impl = "taps"
  taps = jax.jit(functools.partial(make_vqgan(config).apply, method=VQGAN3D.encode))(
      variables, video)  # jitted: as _init
  np.testing.assert_allclose(np.asarray(native), np.asarray(taps), atol=1e-4)


def test_remat_keeps_the_parameter_tree_and_the_reconstruction():
  config = load_config("tiny")
  video = jax.random.uniform(jax.random.PRNGKey(2), (1, 8, 16, 16, 3), minval=-1, maxval=1)
  model, variables = _init(config, video)
  config.vqgan.model.remat = True
  remat_model = make_vqgan(config)
  abstract = jax.eval_shape(lambda: remat_model.init(
      {"params": jax.random.PRNGKey(0), "quantizer": jax.random.PRNGKey(1)}, video))
  assert jax.tree.structure(abstract) == jax.tree.structure(variables)
  remat_x_hat, x_hat = jax.jit(lambda variables, video: (  # jitted: as _init
      remat_model.apply(variables, video)[0], model.apply(variables, video)[0]))(variables, video)
  np.testing.assert_allclose(remat_x_hat, x_hat, rtol=1e-5, atol=1e-6)


def test_causal_tokenizer_decoded_frames_before_a_latent_frames_span_ignore_it():
  config = load_config("tiny")
  config.vqgan.model.causal = True
  config.data.num_frames = 9  # latent frames 0, 1, 2 decode to video frames {0}, {1..4}, {5..8}
  config.vqgan.model.colour_shortcut = True  # its repeated cells must be causal too
  config.vqgan.model.conv_impl = "native"  # one conv per layer: compiles faster than taps
  model = make_vqgan(config)
  # Random parameters from numpy on the traced shapes: compiling the init would take longer.
  # device_put, as jnp.asarray compiles a program for each shape.
  shapes = jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0),
                                       "quantizer": jax.random.PRNGKey(1)},
                          jnp.zeros((1, 9, 16, 16, 3)))
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  rng = np.random.default_rng(1)
  variables = jax.device_put(jax.tree_util.tree_unflatten(treedef, [
      (0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype) for leaf in leaves]))
  # numpy arrays around the one jitted decoder: eager jnp edits and slices compile a program each
  decode = jax.jit(lambda z: model.apply(variables, z, method=VQGAN3D.decode))
  latent = np.random.default_rng(0).standard_normal(
      (1, 3, 4, 4, config.vqgan.model.latent_channels)).astype(np.float32)
  decoded = np.asarray(decode(latent))
  assert decoded.shape == (1, 9, 16, 16, 3)
  for frame, span_start in ((0, 0), (1, 1), (2, 5)):
    flipped = latent.copy()
    flipped[:, frame] = -latent[:, frame]
    changed = np.asarray(decode(flipped))
    np.testing.assert_array_equal(changed[:, :span_start], decoded[:, :span_start])
    assert not np.allclose(changed[:, span_start], decoded[:, span_start])


def test_fold_pixels_puts_each_pixel_block_at_one_position_and_unfold_inverts_it():
  video = np.arange(1 * 2 * 4 * 6 * 3, dtype=np.float32).reshape(1, 2, 4, 6, 3)
  # Jitted: one compile instead of one for each op.
  folded = np.asarray(jax.jit(autoencoder.fold_pixels, static_argnums=1)(video, 2))
  assert folded.shape == (1, 2, 2, 3, 12)
  for row, col, dy, dx, channel in itertools.product(range(2), range(3), range(2), range(2),
                                                     range(3)):
    assert folded[0, 1, row, col, (dy * 2 + dx) * 3 + channel] == \
        video[0, 1, 2 * row + dy, 2 * col + dx, channel]
  np.testing.assert_array_equal(
      np.asarray(jax.jit(autoencoder.unfold_pixels, static_argnums=1)(folded, 2)), video)


def test_spatial_patch_keeps_the_latent_grid_and_the_decoder_unfolds_its_output_channels():
  config = load_config("tiny")
  config.vqgan.model.spatial_patch = 2
  config.vqgan.model.num_res_blocks = 0  # the downsampling convs and the middle blocks only
  config_lib.validate(config)
  assert latent_shape(config, batch_size=2) == (2, 2, 4, 4, config.vqgan.model.latent_channels)
  video = jnp.zeros((1, 8, 16, 16, 3))
  model, variables = _init(config, video)
  params = variables["params"]
  assert params["encoder"]["conv_in"]["kernel"].shape[-2] == 12  # 2 x 2 pixels x RGB
  # The decoder's pixel (y, x, c) is its output channel ((y % 2) * 2 + x % 2) * 3 + c: with a
  # zero kernel and the channel index as bias, every pixel shows which channel it came from.
  out = params["decoder"]["conv_out"]
  params["decoder"]["conv_out"] = {"kernel": jnp.zeros_like(out["kernel"]),
                                   "bias": jnp.arange(12, dtype=jnp.float32)}
  x_hat, _ = jax.jit(model.apply)({**variables, "params": params}, video)  # jitted: as _init
  assert x_hat.shape == video.shape
  y, x, c = np.meshgrid(np.arange(16), np.arange(16), np.arange(3), indexing="ij")
  np.testing.assert_array_equal(np.asarray(x_hat)[0, 3], ((y % 2) * 2 + x % 2) * 3 + c)


def _cells(array, temporal, spatial):
  """``[B, t*a, h*p, w*p, C]`` -> ``[B, t, a, h, p, w, p, C]``."""
  b, t, h, w, c = array.shape
  return array.reshape(b, t // temporal, temporal, h // spatial, spatial, w // spatial, spatial, c)


def _spread_reference(cells, temporal, spatial):
  """Each cell's value repeated over its frames, and in space np.interp between cell centres
  ((j + 0.5) * spatial in pixel coordinates, pixel i at i + 0.5; beyond the outer centres the
  edge value), one axis after the other."""
  for axis in (2, 3):
    size = cells.shape[axis]
    centres, pixels = (np.arange(size) + 0.5) * spatial, np.arange(size * spatial) + 0.5
    cells = np.apply_along_axis(lambda row, c=centres, p=pixels: np.interp(p, c, row), axis, cells)
  return np.repeat(cells, temporal, axis=1)


def test_colour_shortcut_adds_each_cells_mean_colour_to_the_latent_and_spreads_it_back():
  config = load_config("tiny")  # x4 time, x4 space, 4 latent channels
  video = jax.random.uniform(jax.random.PRNGKey(6), (1, 8, 16, 16, 3), minval=-1, maxval=1)
  model, variables = _init(config, video)
  config = config.copy_and_resolve_references()  # the model holds the config it was made from
  config.vqgan.model.colour_shortcut = True
  config_lib.validate(config)
  shortcut = make_vqgan(config)  # no parameters of its own: the same variables apply

  def run(module, method, inputs):
    return np.asarray(jax.jit(lambda x: module.apply(variables, x, method=method))(inputs))

  means = _cells(np.asarray(video, np.float64), 4, 4).mean(axis=(2, 4, 6))  # [1, 2, 4, 4, 3]
  difference = run(shortcut, VQGAN3D.encode, video) - run(model, VQGAN3D.encode, video)
  np.testing.assert_allclose(difference[..., :3], means, atol=1e-5)
  np.testing.assert_allclose(difference[..., 3:], 0.0, atol=1e-5)

  latent = jax.random.normal(jax.random.PRNGKey(7), (1, 2, 4, 4, 4))
  difference = run(shortcut, VQGAN3D.decode, latent) - run(model, VQGAN3D.decode, latent)
  np.testing.assert_allclose(difference, _spread_reference(np.asarray(latent)[..., :3], 4, 4),
                             atol=1e-5)


def test_causal_cell_means_give_frame_zero_its_own_cell():
  video = np.random.default_rng(8).uniform(-1, 1, (1, 9, 4, 4, 3)).astype(np.float32)
  # Jitted: one compile instead of one for each op.
  jit = functools.partial(jax.jit, static_argnums=(1, 2), static_argnames="causal")
  means = np.asarray(jit(autoencoder.cell_means)(video, 4, 2, causal=True))
  assert means.shape == (1, 3, 2, 2, 3)
  np.testing.assert_allclose(means[:, :1], _cells(video[:, :1], 1, 2).mean(axis=(2, 4, 6)),
                             atol=1e-6)
  np.testing.assert_allclose(means[:, 1:], _cells(video[:, 1:], 4, 2).mean(axis=(2, 4, 6)),
                             atol=1e-6)
  spread = np.asarray(jit(autoencoder.spread_cells)(means, 4, 2, causal=True))
  assert spread.shape == video.shape  # frame 0 from cell 0 alone, frames 1-4 from cell 1, ...
  np.testing.assert_allclose(spread, _spread_reference(means, 4, 2)[:, 3:], atol=1e-6)
