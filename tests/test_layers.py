"""3D convolution building blocks: replicate padding, causality, and the conv forms."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vqvdm_jax.models import layers


def _output_and_gradients(apply, params, x):
  """``apply(params, x)`` and the gradients of ``sum(sin(apply(params, x)))`` with respect to
  both, as one jitted program: one compile instead of one per op."""
  loss = lambda p, x: jnp.sum(jnp.sin(apply(p, x)))  # noqa: E731
  return jax.jit(lambda p, x: (apply(p, x), jax.grad(loss, argnums=(0, 1))(p, x)))(params, x)


def test_replicate_padding_equals_numpy_edge_padding():
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 5, 2)).astype(np.float32)
  pads = ((2, 0), (1, 1), (0, 2))
  expected = np.pad(x, ((0, 0), *pads, (0, 0)), mode="edge")
  np.testing.assert_array_equal(np.asarray(layers.replicate_pad(jnp.asarray(x), pads)), expected)


def test_conv3d_pads_with_edge_values_not_zeros():
  # A constant video through a kernel of ones: replicate padding keeps the border equal to the
  # interior, where zero padding would darken it.
  conv = layers.Conv3D(1, use_bias=False, conv_impl="native")
  x = jnp.full((1, 4, 5, 5, 1), 2.0)
  params = {"params": {"kernel": jnp.ones((3, 3, 3, 1, 1))}}
  out = jax.jit(conv.apply)(params, x)
  np.testing.assert_allclose(np.asarray(out), 54.0, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("strides", [(1, 1, 1), (2, 2, 2), (1, 2, 2), (2, 1, 1)])
def test_taps_and_im2col_convs_equal_the_native_conv_and_their_gradients(causal, strides):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 12, 12, 3))
  native = layers.Conv3D(5, strides=strides, causal=causal, conv_impl="native")
  params = jax.jit(native.init)(jax.random.PRNGKey(1), x)
  expected = _output_and_gradients(native.apply, params, x)
  for form in ("taps", "im2col"):
    got_tree = _output_and_gradients(native.clone(conv_impl=form).apply, params, x)
    for got, want in zip(jax.tree.leaves(got_tree), jax.tree.leaves(expected), strict=True):
      # float32 rounding of sums of 10^2-10^3 products, in another order: relative to the
      # leaf's scale (the kernel's gradient reaches ~150; observed error <= 1.3e-6 of it).
      want = np.asarray(want)
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5,
                                 atol=1e-5 * np.abs(want).max())


def _repeat_then_conv(x, kernel, bias, time, space, causal):
  """The upsampling conv written plainly: the input repeated x2 (nearest; causal time without the
  first repeated frame), replicate-padded, then XLA's 3x3x3 conv."""
  if time:
    x = jnp.repeat(x, 2, axis=1)[:, 1:] if causal else jnp.repeat(x, 2, axis=1)
  if space:
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
  x = layers.replicate_pad(x, layers.conv_padding((3, 3, 3), (1, 1, 1), causal))
  return _xla_conv3d(x, kernel, (1, 1, 1)) + bias


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("time, space", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("size, phases", [((3, 4, 5), True), ((2, 2, 2), False)])
def test_upsampling_conv_equals_the_conv_of_the_repeated_input_and_its_gradients(
    monkeypatch, causal, time, space, size, phases):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, *size, 6))
  calls = []
  original = layers.upsampled_conv
  monkeypatch.setattr(layers, "upsampled_conv", lambda *a: calls.append(1) or original(*a))
  upsample = layers.Upsample(7, time, space, causal=causal)
  params = jax.jit(upsample.init)(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda leaf: leaf + 0.1, params)  # a non-zero bias, whose gradient counts
  conv = params["params"]["Conv3D_0"]
  want_tree = _output_and_gradients(
      lambda p, x: _repeat_then_conv(x, p["params"]["Conv3D_0"]["kernel"],
                                     p["params"]["Conv3D_0"]["bias"], time, space, causal),
      params, x)
  frames = 2 * size[0] - causal if time else size[0]
  assert want_tree[0].shape == (2, frames, *(2 * n if space else n for n in size[1:]), 7)
  assert conv["kernel"].shape == (3, 3, 3, 6, 7)  # the parameter of the repeat-then-conv form
  for form in ("native", "taps", "im2col"):
    got_tree = _output_and_gradients(upsample.clone(conv_impl=form).apply, params, x)
    assert bool(calls) == phases  # n = 2 on every upsampled axis: the repeated input's conv
    for got, want in zip(jax.tree.leaves(got_tree), jax.tree.leaves(want_tree), strict=True):
      want = np.asarray(want)  # float32 rounding: the kernel's taps are summed first
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5,
                                 atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("shape, axes, saves", [
    ((1, 4, 2, 2, 512), (False, True, True), False),  # the paper U-Net's 2 x 2: 144 = 144
    ((1, 4, 4, 4, 256), (False, True, True), True),  # its 4 x 4: 400 < 576
    ((4, 2, 8, 8, 32), (True, False, False), False),  # 2 frames: 12 = 12
    ((4, 2, 8, 8, 32), (True, True, True), True),  # 12 x 36 x 36 < 12 x 48 x 48
    ((4, 3, 8, 8, 32), (True, False, False), True)])  # 3 frames: 16 < 18
def test_phases_run_where_they_save_flops(shape, axes, saves):
  assert layers.phases_save_flops(shape, axes) == saves


def test_upsampling_phase_kernel_sums_the_taps_each_output_phase_reads():
  kernel = jnp.arange(3.0).reshape(1, 3, 1, 1, 1) + 1  # w0, w1, w2 = 1, 2, 3 along H
  phases = layers.upsampling_phase_kernel(kernel, (False, True, False))
  # even rows read (x[j-1], x[j]) with (w0, w1 + w2); odd rows (x[j], x[j+1]) with (w0 + w1, w2)
  taps_by_phase = np.asarray(phases)[0, :, 0, 0].T  # [phase, tap]
  np.testing.assert_array_equal(taps_by_phase, [[1, 5], [3, 3]])
  with pytest.raises(ValueError, match="3 taps"):
    layers.upsampling_phase_kernel(jnp.ones((3, 1, 1, 1, 1)), (False, True, False))
  x = jnp.zeros((1, 3, 3, 3, 1))
  for bad in (layers.Conv3D(1, (1, 3, 3), upsample=(False, True, True)),
              layers.Conv3D(1, strides=(1, 2, 2), upsample=(True, False, False))):
    with pytest.raises(ValueError, match="3x3x3 kernel and stride 1"):
      jax.eval_shape(bad.init, jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("backend, shape, axes, expected", [
    # patch matrix: 4 x 9 x 9 positions x 8 taps x 32 channels (the demo decoder's)
    ("cpu", (4, 4, 8, 8, 32), (True, True, True), "im2col"),
    # 3 x 5 x 5 positions x 12 taps = 900 x C_in elements: 4,660 channels fit 16 MiB, 4,661 not
    ("cpu", (1, 3, 4, 4, 4660), (False, True, True), "im2col"),
    ("cpu", (1, 3, 4, 4, 4661), (False, True, True), "native"),
    ("gpu", (4, 4, 8, 8, 32), (True, True, True), "native")])
def test_auto_upsampling_conv_impl_follows_the_backend_and_patch_rule(
    monkeypatch, backend, shape, axes, expected):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert layers.resolve_upsampling_conv_impl("auto", shape, axes) == expected
  for conv_impl in ("native", "taps", "im2col"):
    assert layers.resolve_upsampling_conv_impl(conv_impl, shape, axes) == conv_impl
  with pytest.raises(ValueError, match="conv_impl"):
    layers.resolve_upsampling_conv_impl("fft", shape, axes)


def _xla_conv3d(x, kernel, strides):
  """XLA's own strided conv, differentiated by JAX's rules: the reference of every form."""
  return jax.lax.conv_general_dilated(x, kernel, strides, "VALID",
                                      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


@pytest.mark.parametrize("kernel_size, strides", [
    ((3, 3, 3), (1, 1, 1)), ((4, 4, 4), (2, 2, 2)), ((4, 4, 4), (1, 2, 2)),
    ((2, 4, 4), (2, 2, 1)), ((3, 3, 3), (2, 2, 2))])
@pytest.mark.parametrize("form", ["native", "taps", "im2col"])
def test_canonical_gradients_equal_xlas_conv_and_its_autodiff_gradients(form, kernel_size,
                                                                        strides):
  # With canonical_gradients, on CPU a kernel that is a multiple of its stride runs folded
  # space-to-depth as a stride-1 conv, and stride-1 convs have hand-written gradients
  # (layers._unit_stride_conv): values and both gradients must equal XLA's strided conv
  # differentiated by JAX.
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 11, 10, 3))
  conv = layers.Conv3D(5, kernel_size, strides, conv_impl=form, canonical_gradients=True)
  params = jax.jit(conv.init)(jax.random.PRNGKey(1), x)
  pads = layers.conv_padding(kernel_size, strides, causal=False)

  def reference(p, x):
    kernel, bias = p["params"]["kernel"], p["params"]["bias"]
    return _xla_conv3d(layers.replicate_pad(x, pads), kernel, strides) + bias

  assert layers.folds_strides(kernel_size, strides) == (kernel_size[1] == 4)
  got = _output_and_gradients(conv.apply, params, x)
  want = _output_and_gradients(reference, params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["native", "taps"])
def test_canonical_gradients_inside_a_cond_are_canonical_convolutions(form):
  # XLA:CPU runs a convolution in its Eigen kernels only in the canonical layout; it rewrites
  # autodiff's gradient convs into it in the entry computation only, so inside a lax.cond (the
  # discriminator's) they ran in its generic loop emitter, 50-400x slower. Every convolution of
  # a gradient through a strided and a plain conv inside a cond must be canonical.
  spatial = 3 if form == "native" else 2
  canonical = {3: "b012f_012io->b012f", 2: "b01f_01io->b01f"}[spatial]
  first = layers.Conv3D(4, (4, 4, 4), (2, 2, 2), conv_impl=form, canonical_gradients=True)
  second = layers.Conv3D(3, (3, 3, 3), conv_impl=form, canonical_gradients=True)
  x = jnp.ones((1, 8, 8, 8, 3))
  params = [jax.jit(first.init)(jax.random.PRNGKey(0), x),
            jax.jit(second.init)(jax.random.PRNGKey(1), jnp.ones((1, 4, 4, 4, 4)))]

  def loss(params, x, on):
    stack = lambda: jnp.sum(second.apply(params[1], first.apply(params[0], x)) ** 2)  # noqa: E731
    return jax.lax.cond(on, stack, lambda: 0.0)

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, True).compile().as_text()
  labels = re.findall(r" convolution\(.*dim_labels=([^,]+),", hlo)
  assert len(labels) >= 6, hlo  # two forward convs, each with two gradient convs
  assert set(labels) == {canonical}, labels


@pytest.mark.parametrize("strides", [(1, 1, 1), (2, 2, 2)])
def test_taps_conv_in_chunks_of_frames_equals_one_call_and_its_gradients(monkeypatch, strides):
  # A limit of a few frames' elements splits each tap's 2D conv into chunks (the last one short);
  # values and both gradients must not change beyond float32 rounding.
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 10, 10, 4))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4, 6))
  loss = lambda x, k: jnp.sum(jnp.sin(layers._temporal_taps_conv3d(x, k, strides)))  # noqa: E731

  def value_and_grads():
    # Jitted: one compile instead of one per op. A new jit traces again, with the patches.
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, kernel)

  expected = value_and_grads()
  calls = []
  original = jax.lax.conv_general_dilated
  monkeypatch.setattr(jax.lax, "conv_general_dilated",
                      lambda f, *a, **k: calls.append(f.shape[0]) or original(f, *a, **k))
  monkeypatch.setattr(layers, "TAPS_CHUNK_ELEMENTS", 3 * 10 * 10 * 4 + 3 * 8 * 8 * 6)
  got = value_and_grads()
  assert len(calls) > 3  # more 2D convs than taps: chunked
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-5)


def test_causal_strided_conv_maps_one_plus_2k_frames_to_one_plus_k():
  conv = layers.Conv3D(2, strides=(2, 1, 1), causal=True)
  for frames, expected in ((1, 1), (5, 3), (9, 5), (16, 8)):
    x = jnp.zeros((1, frames, 4, 4, 1))
    variables = jax.eval_shape(conv.init, jax.random.PRNGKey(0), x)
    out = jax.eval_shape(lambda v, x=x: conv.apply(v, x), variables)
    assert out.shape[1] == expected


def test_causal_conv_output_ignores_future_frames():
  conv = layers.Conv3D(3, causal=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 4, 4, 2))
  params = jax.jit(conv.init)(jax.random.PRNGKey(1), x)
  changed = x.at[:, 3].add(1.0)
  apply = jax.jit(conv.apply)
  before, after = apply(params, x), apply(params, changed)
  before, after = np.asarray(before), np.asarray(after)
  np.testing.assert_array_equal(before[:, :3], after[:, :3])
  assert not np.allclose(before[:, 3], after[:, 3])


def test_frame_causal_mask_lets_tokens_see_only_current_and_past_frames():
  mask = np.asarray(jax.jit(layers.frame_causal_mask, static_argnums=(0, 1))(3, 2))
  expected = np.kron(np.tril(np.ones((3, 3), bool)), np.ones((2, 2), bool))
  np.testing.assert_array_equal(mask, expected)


def test_group_count_divides_channels():
  assert layers.group_count(48, 32) == 24
  assert layers.group_count(8, 32) == 8
  assert layers.group_count(12, 8) == 6


@pytest.mark.parametrize("scale_shift", [False, True])
def test_res_block_conditioning_matches_its_formula(scale_shift):
  # With the convs' kernels zeroed around the conditioning, the block's second half sees only
  # GroupNorm(conv1(h)) and the projected embedding: additive (the paper) or AdaGN's
  # GroupNorm(h) * (1 + scale) + shift (Dhariwal & Nichol 2021).
  features = 4
  block = layers.ResBlock3D(features, num_groups=2, conv_impl="native", scale_shift=scale_shift)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 4, 4, features))
  embedding = jax.random.normal(jax.random.PRNGKey(1), (2, 6))
  params = jax.jit(block.init)(jax.random.PRNGKey(2), x, embedding)["params"]
  assert params["Dense_0"]["kernel"].shape == (6, 2 * features if scale_shift else features)
  # The second conv becomes the identity (its centre tap), so out = x + silu(conditioned norm).
  identity = np.zeros((3, 3, 3, features, features), np.float32)
  identity[1, 1, 1] = np.eye(features)
  params = {**params, "Conv3D_1": {"kernel": identity, "bias": np.zeros(features, np.float32)}}

  def group_norm(v):  # two groups, GroupNorm's initial scale 1 and bias 0
    groups = v.reshape(*v.shape[:-1], 2, features // 2)
    mean = groups.mean(axis=(1, 2, 3, 5), keepdims=True)
    var = groups.var(axis=(1, 2, 3, 5), keepdims=True)
    return ((groups - mean) / jnp.sqrt(var + 1e-6)).reshape(v.shape)

  @jax.jit  # One compile instead of one per op.
  def out_and_expected(params, x, embedding):
    out = block.apply({"params": params}, x, embedding)
    h = layers.Conv3D(features, conv_impl="native").apply(
        {"params": params["Conv3D_0"]}, nn.silu(group_norm(x)))
    projected = nn.silu(embedding) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    projected = projected[:, None, None, None, :]
    if scale_shift:
      scale, shift = projected[..., :features], projected[..., features:]
      return out, x + nn.silu(group_norm(h) * (1 + scale) + shift)
    return out, x + nn.silu(group_norm(h + projected))

  out, expected = out_and_expected(params, x, embedding)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-4)


@pytest.mark.parametrize("backend, in_channels, out_channels, size, expected", [
    ("cpu", 16, 16, 32, "taps"),  # the demo's narrow layers
    ("cpu", 64, 64, 32, "taps"),  # the paper tokenizer's wide, large layers
    ("cpu", 64, 64, 4, "taps"),  # the demo U-Net's widest level, on few positions
    ("cpu", 128, 128, 4, "im2col"),  # a wide layer on few positions: the patch matrix is small
    ("cpu", 128, 2, 4, "im2col"),  # ... also where it narrows the channels, on <= 256 positions
    ("cpu", 128, 64, 6, "taps"),  # ... but not on more (the demo U-Net's up path)
    ("cpu", 128, 128, 6, "im2col"),  # ... where a conv keeping its width still runs as im2col
    ("cpu", 128, 128, 32, "taps"),  # ... until the patch matrix passes 8 MiB
    ("gpu", 128, 128, 4, "native"), ("tpu", 16, 16, 32, "native")])
def test_auto_conv_impl_follows_the_backend_and_shape_rule(monkeypatch, backend, in_channels,
                                                           out_channels, size, expected):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  for conv_impl in ("native", "taps", "im2col"):
    assert layers.resolve_conv_impl(conv_impl, in_channels, 1) == conv_impl
  with pytest.raises(ValueError, match="conv_impl"):
    layers.resolve_conv_impl("fft")
  # Conv3D runs the form the rule picks for its input: one 3x3x3 conv over size^3 positions.
  calls = []

  def spy_on(name: str) -> None:
    original = getattr(layers, name)

    def spy(*args):
      calls.append(name)
      return original(*args)

    monkeypatch.setattr(layers, name, spy)

  for name in ("_native_conv3d", "_temporal_taps_conv3d", "_im2col_conv3d"):
    spy_on(name)
  x = jnp.zeros((1, size + 2, size + 2, size + 2, in_channels))
  jax.eval_shape(layers.Conv3D(out_channels).init, jax.random.PRNGKey(0), x)
  assert calls == [{"taps": "_temporal_taps_conv3d", "native": "_native_conv3d",
                    "im2col": "_im2col_conv3d"}[expected]]
