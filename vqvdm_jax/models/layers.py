"""Building blocks shared by the tokenizer, the discriminator and the U-Net.

Every 3D convolution pads by replicating edge values (TATS, VQ-VDM §3.1) and then convolves
with VALID padding. Three numerically equal implementations exist (PERFORMANCE.md,
benchmarks/RESULTS.md "conv forms"): XLA's native 3D convolution; a sum over temporal taps of
2D convolutions batched over frames (2-4x faster on CPU at narrow channels); and im2col, the
patches of every output position gathered into one matrix and multiplied by the kernel once
(on CPU XLA's convolution *backward* at small spatial sizes and wide channels runs 10-60x its
forward; as a matmul it runs like the forward). All read the same
``kernel [kt, kh, kw, C_in, C_out]`` parameter, so a checkpoint trained with one runs with the
others. An upsampling conv (nearest x2, then a 3x3x3 conv) never builds the repeated input: one
conv of the input itself with 2-tap phase kernels gives every output phase (:func:`upsampled_conv`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from vqvdm_jax.models.attention import resolve_attention_impl

Dtype = Any
Pads = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


CONV_IMPLS = ("auto", "native", "taps", "im2col")
# CPU rule of 'auto' (benchmarks/RESULTS.md, "conv forms" and "Eleventh session"): im2col where
# the patch matrix is small and the input wide, temporal taps everywhere else. XLA's native conv
# no longer wins anywhere on CPU since the taps form runs in cache-sized chunks of frames: on the
# paper's 16x64x64 tokenizer taps run 1.6-1.8x faster than native (two machines), and the demo
# U-Net's train step 1.4x faster without its native layers.
IM2COL_MAX_PATCH_ELEMENTS = 2**21  # output positions x taps x C_in: 8 MiB of float32
IM2COL_MIN_CHANNELS = 128
# A conv that narrows its channels (C_out < C_in: the U-Nets' up paths after the skip
# concatenation) runs as im2col only on at most this many output positions. im2col's backward
# scatters the patch matrix's gradient back onto the input, a cost of the patch's size whatever
# C_out is: the demo U-Net's 16x2x4x4x128 -> 64 conv took 17.1 ms forward+backward as im2col and
# 5.3 ms as taps, while the paper U-Net's 1x4x8x8x256 -> 128 (256 positions) took 6.3 and 10.8
# (benchmarks/RESULTS.md, "Fourteenth session").
IM2COL_MAX_NARROWING_POSITIONS = 256
# The taps form's 2D convolutions run in chunks of frames whose input plus output is at most this
# many elements (1 MiB of float32). XLA:CPU's convolution, and above all its kernel gradient (a
# conv with a 32x32 window), slows 3-9x once one call's frames outgrow the cache: at the demo's
# 32 frames of 34x34x32 one call took 171 ms for the kernel gradient, 4 calls of 8 frames 56 ms
# (benchmarks/RESULTS.md, "Issue 18, continued").
TAPS_CHUNK_ELEMENTS = 2**18
# The upsampling convolution's phase conv (upsampled_conv) runs as im2col up to this many patch
# elements (16 MiB of float32), as XLA's native conv beyond: resolve_upsampling_conv_impl.
UPSAMPLING_IM2COL_MAX_PATCH_ELEMENTS = 2**22


def _form_without_a_cpu_rule(conv_impl: str) -> str | None:
  """An explicit ``conv_impl`` itself, 'auto' off CPU 'native', None where a CPU rule decides."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.")
  if conv_impl != "auto":
    return conv_impl
  return None if jax.default_backend() == "cpu" else "native"


def resolve_conv_impl(conv_impl: str, in_channels: int | None = None,
                      patch_elements: int | None = None, out_channels: int | None = None,
                      positions: int | None = None) -> str:
  """The form one convolution runs in. 'auto': XLA's native conv off CPU; on CPU, per layer, by
  the patch matrix (``patch_elements`` = output ``positions`` x kernel taps x ``in_channels``):
  im2col when it fits 8 MiB and ``in_channels >= 128``, unless a kernel of more than one tap
  narrows the channels (``out_channels < in_channels``) on more than 256 positions; temporal taps
  otherwise (and without the shape, ``None``)."""
  form = _form_without_a_cpu_rule(conv_impl)
  if form is not None:
    return form
  if in_channels is None or patch_elements is None:
    return "taps"
  if patch_elements > IM2COL_MAX_PATCH_ELEMENTS or in_channels < IM2COL_MIN_CHANNELS:
    return "taps"
  narrowing = out_channels is not None and out_channels < in_channels
  many_taps = positions is not None and patch_elements > positions * in_channels
  if narrowing and many_taps and positions > IM2COL_MAX_NARROWING_POSITIONS:
    return "taps"
  return "im2col"


def resolve_upsampling_conv_impl(conv_impl: str, input_shape: Sequence[int],
                                 axes: Sequence[bool]) -> str:
  """The form of :func:`upsampled_conv`'s phase conv of ``input_shape [B, T, H, W, C_in]``,
  whose kernel has 2 taps on each upsampled axis (3 on the others) and 2^d times the output
  channels. 'auto': native off CPU; on CPU im2col while its patch matrix (output positions, one
  more than the input's on each upsampled axis, x taps x C_in) fits 16 MiB, XLA's native conv
  beyond. The 3x3x3 rule (:func:`resolve_conv_impl`) does not carry over: at the demo's 32
  channels im2col ran the phase conv's forward+backward in 7.4 ms against taps' 11.6, and on the
  paper tokenizer's widest one (9 x 33 x 33 positions, 128 -> 8 x 128 channels) native and
  im2col tied (872 and 827 ms) where taps took 1,574 (benchmarks/RESULTS.md, "Twenty-first
  session")."""
  form = _form_without_a_cpu_rule(conv_impl)
  if form is not None:
    return form
  patch_elements = input_shape[0] * input_shape[-1] * math.prod(
      2 * (size + 1) if upsampled else 3 * size
      for size, upsampled in zip(input_shape[1:4], axes))
  return "im2col" if patch_elements <= UPSAMPLING_IM2COL_MAX_PATCH_ELEMENTS else "native"


def conv_padding(kernel_size: Sequence[int], strides: Sequence[int], causal: bool) -> Pads:
  """(before, after) padding per (T, H, W) axis that makes a VALID conv 'same'-sized / strided.

  Each axis gets ``k - s`` frames in total, the extra one (if odd) before. A causal conv puts
  ``k - 1`` on the past side of time only, so output frame t reads input frames <= t*s and a
  stride-2 conv maps T frames to ceil(T / 2): MAGVIT-v2's 1 + 4k -> 1 + k with the first frame
  encoded alone.
  """
  pads = []
  for axis, (k, s) in enumerate(zip(kernel_size, strides)):
    if axis == 0 and causal:
      pads.append((k - 1, 0))
    else:
      total = max(k - s, 0)
      pads.append((total - total // 2, total // 2))
  return tuple(pads)  # type: ignore[return-value]


def replicate_pad(x: jax.Array, pads: Pads) -> jax.Array:
  """Pads the (T, H, W) axes of ``x [B, T, H, W, C]`` by repeating edge values (numpy 'edge')."""
  if all(before == 0 and after == 0 for before, after in pads):
    return x
  return jnp.pad(x, ((0, 0), *pads, (0, 0)), mode="edge")


_CHANNEL_LAST = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def _lax_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Any = "VALID"
              ) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, window_strides=tuple(strides), padding=padding,
                                      dimension_numbers=_CHANNEL_LAST[kernel.ndim - 2])


@jax.custom_vjp
def _unit_stride_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """VALID stride-1 conv (2D or 3D, channel-last) whose gradients are themselves convolutions in
  XLA:CPU's canonical layout."""
  return _lax_conv(x, kernel, (1,) * (kernel.ndim - 2))


def _unit_stride_conv_forward(x, kernel):
  return _unit_stride_conv(x, kernel), (x, kernel)


def _unit_stride_conv_backward(residuals, dy):
  x, kernel = residuals
  spatial = kernel.ndim - 2
  window = kernel.shape[:spatial]
  # dx: the 'full' conv of dy with the kernel flipped in space and its features swapped.
  flipped = jnp.swapaxes(jnp.flip(kernel, tuple(range(spatial))), -1, -2)
  dx = _lax_conv(dy, flipped, (1,) * spatial, [(k - 1, k - 1) for k in window])
  # dkernel[k, i, o] = sum_{b, s} x[b, s + k, i] dy[b, s, o]: a conv with x's features as its
  # batch, x's batch as its features and dy as its kernel.
  dkernel = _lax_conv(jnp.moveaxis(x, (0, -1), (-1, 0)), jnp.moveaxis(dy, 0, -2),
                      (1,) * spatial)
  return dx, jnp.moveaxis(dkernel, 0, -2)


_unit_stride_conv.defvjp(_unit_stride_conv_forward, _unit_stride_conv_backward)


def _conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
          canonical_gradients: bool = False) -> jax.Array:
  """VALID conv, channel-last; with ``canonical_gradients``, a stride-1 conv on CPU is
  :func:`_unit_stride_conv`.

  XLA:CPU runs a convolution in its Eigen kernels only in the canonical layout (batch first,
  features last, kernel ``[..., in, out]``). Autodiff's gradient convolutions have other layouts,
  which XLA:CPU transposes into the canonical one in the entry computation only: inside a
  ``lax.cond`` (the discriminator's, off before ``disc_start``) they ran in its generic loop
  emitter, 200-470 ms each on the tests' tiny discriminator, most of the stage-1 step
  (benchmarks/RESULTS.md, "Convolutions differentiated inside lax.cond"). Elsewhere XLA's own
  gradients are kept: they run as fast or faster (the U-Net's step ~30 % faster at level 0).
  """
  if canonical_gradients and jax.default_backend() == "cpu" and all(s == 1 for s in strides):
    return _unit_stride_conv(x, kernel)
  return _lax_conv(x, kernel, strides)


def _native_conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                   canonical_gradients: bool = False) -> jax.Array:
  return _conv(x, kernel, strides, canonical_gradients)


def _conv2d(frames: jax.Array, kernel: jax.Array, strides: Sequence[int],
            canonical_gradients: bool = False) -> jax.Array:
  """VALID 2D conv of ``frames [N, H, W, C]``, in chunks of frames of at most
  ``TAPS_CHUNK_ELEMENTS`` input plus output elements; each chunk is an independent conv."""
  frames_total, height, width, in_features = frames.shape
  kh, kw, _, out_features = kernel.shape
  per_frame = (height * width * in_features + _output_size(height, kh, strides[0])
               * _output_size(width, kw, strides[1]) * out_features)
  chunk = max(1, TAPS_CHUNK_ELEMENTS // per_frame)
  conv = lambda f: _conv(f, kernel, strides, canonical_gradients)  # noqa: E731
  if chunk >= frames_total:
    return conv(frames)
  return jnp.concatenate([conv(frames[start: start + chunk])
                          for start in range(0, frames_total, chunk)])


def _temporal_taps_conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                          canonical_gradients: bool = False) -> jax.Array:
  """The 3D conv as sum_k conv2d(x[t*s + k], kernel[k]), each 2D conv batched over B*T frames
  (in cache-sized chunks of frames: :func:`_conv2d`)."""
  batch, padded_frames = x.shape[:2]
  kt = kernel.shape[0]
  st = strides[0]
  out_frames = (padded_frames - kt) // st + 1
  out = None
  for tap in range(kt):
    frames = x[:, tap: tap + (out_frames - 1) * st + 1: st]
    frames = einops.rearrange(frames, "b t h w c -> (b t) h w c")
    term = _conv2d(frames, kernel[tap], strides[1:], canonical_gradients)
    out = term if out is None else out + term
  return einops.rearrange(out, "(b t) h w c -> b t h w c", b=batch)


def _output_size(size: int, kernel: int, stride: int) -> int:
  return (size - kernel) // stride + 1


def _im2col_conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                   canonical_gradients: bool = False) -> jax.Array:
  """The 3D conv as one matmul: ``[positions, taps * C_in] @ [taps * C_in, C_out]``, the patch
  matrix's columns ordered like the kernel's flattened ``(kt, kh, kw, C_in)``. Its gradients are
  matmuls wherever they run (``canonical_gradients`` has nothing to change)."""
  del canonical_gradients
  kt, kh, kw, in_features, out_features = kernel.shape
  out_t, out_h, out_w = (_output_size(size, k, s) for size, k, s in
                         zip(x.shape[1:4], (kt, kh, kw), strides))
  st, sh, sw = strides
  patches = jnp.concatenate(
      [x[:, a: a + (out_t - 1) * st + 1: st, b: b + (out_h - 1) * sh + 1: sh,
         c: c + (out_w - 1) * sw + 1: sw]
       for a in range(kt) for b in range(kh) for c in range(kw)], axis=-1)
  return jnp.einsum("bthwk,ko->bthwo", patches,
                    kernel.reshape(kt * kh * kw * in_features, out_features))


_CONV_FORMS = {"native": "_native_conv3d", "taps": "_temporal_taps_conv3d",
               "im2col": "_im2col_conv3d"}


def folds_strides(kernel_size: Sequence[int], strides: Sequence[int]) -> bool:
  """Whether a strided conv with canonical gradients runs as :func:`fold_strided_conv`'s
  stride-1 conv: on CPU, when every kernel axis is a multiple of its stride (the discriminator's
  kernel 4, stride 2), so that :func:`_conv` can give it canonical gradients too. Accelerators
  keep the strided conv."""
  return (jax.default_backend() == "cpu" and any(s > 1 for s in strides)
          and all(k % s == 0 for k, s in zip(kernel_size, strides)))


def fold_strided_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int]
                      ) -> tuple[jax.Array, jax.Array]:
  """A VALID conv of stride ``s`` as an equal stride-1 conv: ``(x, kernel)`` folded space to depth.

  With every kernel axis ``k`` a multiple of its stride, output ``t`` reads input ``t*s + q*s + r``
  through tap ``q*s + r`` (``q < k/s``, ``r < s``): a stride-1 conv, kernel ``k/s``, over the input
  whose ``s x s x s`` blocks are folded into channels, against the kernel folded the same way.
  Returns the folded input (cropped to the positions the conv reads) and kernel; the parameter
  keeps its ``[kt, kh, kw, C_in, C_out]`` shape.
  """
  (st, sh, sw), (kt, kh, kw) = strides, kernel.shape[:3]
  read = [(_output_size(size, k, s) - 1) * s + k
          for size, k, s in zip(x.shape[1:4], (kt, kh, kw), (st, sh, sw))]
  x = einops.rearrange(x[:, :read[0], :read[1], :read[2]],
                       "b (t st) (h sh) (w sw) c -> b t h w (st sh sw c)", st=st, sh=sh, sw=sw)
  kernel = einops.rearrange(kernel, "(kt st) (kh sh) (kw sw) i o -> kt kh kw (st sh sw i) o",
                            st=st, sh=sh, sw=sw)
  return x, kernel


def repeat_x2(x: jax.Array, axes: Sequence[bool], causal: bool) -> jax.Array:
  """``x [B, T, H, W, C]`` repeated x2 (nearest) on ``axes`` (T, H, W); causal time drops the
  first repeated frame (T -> 2T - 1), inverting the causal downsampling's 1 + 2k -> 1 + k."""
  for axis, upsampled in enumerate(axes, start=1):
    if upsampled:
      x = jnp.repeat(x, 2, axis=axis)
  return x[:, 1:] if causal and axes[0] else x


def phases_save_flops(input_shape: Sequence[int], axes: Sequence[bool]) -> bool:
  """Whether :func:`upsampled_conv` does fewer multiply-adds than the conv of the repeated input:
  on an upsampled axis of n positions its phase conv covers n + 1 windows x 2 phases x 2 taps,
  the conv of the repeated input 2n positions x 3 taps; fewer from n = 3 on (2/3 as n grows). At
  n = 2 (the paper U-Net's 2 x 2 -> 4 x 4) the phases only add their interleaving: its train
  step ran 4 % slower with them (benchmarks/RESULTS.md, "Twenty-first session")."""
  sizes = [size for size, upsampled in zip(input_shape[1:4], axes) if upsampled]
  return math.prod(4 * (n + 1) for n in sizes) < math.prod(6 * n for n in sizes)


def upsampling_phase_kernel(kernel: jax.Array, axes: Sequence[bool]) -> jax.Array:
  """The 3-tap ``kernel [kt, kh, kw, C_in, C_out]`` as the 2-tap kernels of the output phases of
  a conv over an input repeated x2 on ``axes``: ``[.., C_in, (pw ph pt C_out)]``.

  On an axis repeated x2 (u[2j] = u[2j + 1] = x[j]), a 3-tap conv gives the even outputs
  w0 x[j-1] + (w1 + w2) x[j] and the odd ones (w0 + w1) x[j] + w2 x[j+1]: two 2-tap kernels over
  x itself, read from x[j-1] and from x[j] (the sub-pixel convolution of Shi et al. 2016, here
  derived from the nearest-neighbour upsampling it replaces). Each upsampled axis doubles the
  output channels, the latest axis outermost.
  """
  for axis, upsampled in enumerate(axes):
    if not upsampled:
      continue
    if kernel.shape[axis] != 3:
      raise ValueError(f"an upsampling conv needs 3 taps on each upsampled axis, got kernel "
                       f"{kernel.shape[:3]} for axes {tuple(axes)}.")
    w0, w1, w2 = (jax.lax.index_in_dim(kernel, tap, axis) for tap in range(3))
    phases = jnp.stack([jnp.concatenate([w0, w1 + w2], axis),
                        jnp.concatenate([w0 + w1, w2], axis)], axis=-2)
    kernel = phases.reshape(*phases.shape[:-2], -1)
  return kernel


def upsampled_conv(x: jax.Array, kernel: jax.Array, axes: Sequence[bool], causal: bool,
                   conv_impl: str, dtype: Dtype) -> jax.Array:
  """``conv(repeat_x2(x))``: a stride-1, replicate-padded 3D conv (kernel 3 on the repeated axes)
  of ``x [B, T, H, W, C]`` repeated x2 on ``axes`` (T, H, W); causal time drops the first
  repeated frame (2T - 1 frames).

  One conv over x with :func:`upsampling_phase_kernel`'s 2-tap phase kernels, its outputs
  interleaved, instead of a conv over the 2^d times larger repeated input: per output position
  2 taps instead of 3 on each upsampled axis, (3/2)^d fewer FLOPs (3.4x in time and space) and
  no repeated copy. Equal up to float32 rounding (the kernel's taps are summed first). A padded
  x (1 edge value a side) serves every phase; causal time equals the non-causal result without
  its last frame (the repeat's first frame dropped shifts every causal window onto the same
  inputs).
  """
  _, frames, height, width, _ = x.shape
  form = resolve_upsampling_conv_impl(conv_impl, x.shape, axes)
  pads = tuple((1, 1) if upsampled else pad
               for upsampled, pad in zip(axes, conv_padding((3, 3, 3), (1, 1, 1), causal)))
  x = replicate_pad(x, pads)  # type: ignore[arg-type]
  phase_kernel = upsampling_phase_kernel(kernel, axes).astype(dtype)
  y = globals()[_CONV_FORMS[form]](x, phase_kernel, (1, 1, 1))
  counts = [2 if upsampled else 1 for upsampled in axes]
  y = y.reshape(*y.shape[:-1], *reversed(counts), kernel.shape[-1])
  parts = jnp.stack([jnp.stack([jnp.stack([
      y[:, pt: pt + frames, ph: ph + height, pw: pw + width, pw, ph, pt]
      for pw in range(counts[2])]) for ph in range(counts[1])]) for pt in range(counts[0])])
  y = einops.rearrange(parts, "pt ph pw b t h w o -> b (t pt) (h ph) (w pw) o")
  return y[:, :-1] if causal and axes[0] else y


class Conv3D(nn.Module):
  """3D convolution with replicate padding (optionally causal in time). ``[B,T,H,W,C]`` in/out.

  ``canonical_gradients``: for a conv differentiated inside ``lax.cond`` (the discriminator),
  gradients XLA:CPU runs in its conv kernels (:func:`_conv`); numerically the same conv.
  ``upsample`` (T, H, W): the conv of the input repeated x2 (nearest, :func:`repeat_x2`) on those
  axes, with a 3x3x3 kernel and stride 1; computed without the repeat (:func:`upsampled_conv`)
  wherever that does fewer FLOPs (:func:`phases_save_flops`).
  """

  features: int
  kernel_size: tuple[int, int, int] = (3, 3, 3)
  strides: tuple[int, int, int] = (1, 1, 1)
  causal: bool = False
  conv_impl: str = "auto"
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  canonical_gradients: bool = False
  upsample: tuple[bool, bool, bool] = (False, False, False)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    if any(self.upsample):
      if tuple(self.kernel_size) != (3, 3, 3) or any(s != 1 for s in self.strides):
        raise ValueError(f"an upsampling Conv3D has a 3x3x3 kernel and stride 1, got kernel "
                         f"{self.kernel_size} and strides {self.strides}.")
      if phases_save_flops(x.shape, self.upsample):
        y = upsampled_conv(x.astype(self.dtype), kernel, self.upsample, self.causal,
                           self.conv_impl, self.dtype)
        return self._add_bias(y)
      x = repeat_x2(x, self.upsample, self.causal)
    x = replicate_pad(x.astype(self.dtype), conv_padding(self.kernel_size, self.strides, self.causal))
    kernel = kernel.astype(self.dtype)
    strides = self.strides
    if self.canonical_gradients and folds_strides(self.kernel_size, strides):
      x, kernel = fold_strided_conv(x, kernel, strides)
      strides = (1, 1, 1)
    kernel_size, in_features = kernel.shape[:3], kernel.shape[3]
    positions = x.shape[0] * math.prod(_output_size(size, k, s) for size, k, s in
                                       zip(x.shape[1:4], kernel_size, strides))
    form = resolve_conv_impl(self.conv_impl, in_features,
                             positions * math.prod(kernel_size) * in_features,
                             kernel.shape[4], positions)
    # Looked up by name at call time, so tests can watch which form ran.
    y = globals()[_CONV_FORMS[form]](x, kernel, strides, self.canonical_gradients)
    return self._add_bias(y)

  def _add_bias(self, y: jax.Array) -> jax.Array:
    if not self.use_bias:
      return y
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return y + bias.astype(self.dtype)


def group_count(channels: int, num_groups: int) -> int:
  """The largest group count <= num_groups that divides the channel count."""
  groups = min(num_groups, channels)
  while channels % groups:
    groups -= 1
  return groups


class Normalize(nn.Module):
  """GroupNorm over (T, H, W, channels-in-group); per frame when ``causal`` so no future leaks."""

  num_groups: int = 32
  causal: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    norm = nn.GroupNorm(num_groups=group_count(x.shape[-1], self.num_groups), epsilon=1e-6,
                        dtype=x.dtype)
    if not self.causal:
      return norm(x)
    batch = x.shape[0]
    frames = einops.rearrange(x, "b t h w c -> (b t) h w c")
    return einops.rearrange(norm(frames), "(b t) h w c -> b t h w c", b=batch)


class ResBlock3D(nn.Module):
  """GroupNorm -> SiLU -> Conv3D, twice, plus a (1x1x1-projected) skip connection.

  ``embedding [B, D]``, if given, is projected to the channels and added between the two convs
  (the U-Net's conditioning, VQ-VDM §3.2). With ``scale_shift`` it is projected to a per-channel
  scale and shift of the second GroupNorm instead: AdaGN, Dhariwal & Nichol 2021 §3,
  h = GroupNorm(h) · (1 + scale) + shift.
  """

  features: int
  num_groups: int = 32
  causal: bool = False
  conv_impl: str = "auto"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  scale_shift: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, embedding: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    conv = lambda features, kernel: Conv3D(  # noqa: E731
        features, kernel, causal=self.causal, conv_impl=self.conv_impl, dtype=self.dtype)
    h = nn.silu(Normalize(self.num_groups, self.causal)(x))
    h = conv(self.features, (3, 3, 3))(h)
    if embedding is None:
      h = Normalize(self.num_groups, self.causal)(h)
    elif self.scale_shift:
      projected = nn.Dense(2 * self.features, dtype=self.dtype)(nn.silu(embedding))
      scale, shift = jnp.split(projected[:, None, None, None, :], 2, axis=-1)
      h = Normalize(self.num_groups, self.causal)(h) * (1 + scale) + shift
    else:
      projected = nn.Dense(self.features, dtype=self.dtype)(nn.silu(embedding))
      h = Normalize(self.num_groups, self.causal)(h + projected[:, None, None, None, :])
    h = nn.silu(h)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = conv(self.features, (3, 3, 3))(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, (1, 1, 1))(x)
    return x.astype(h.dtype) + h


class Downsample(nn.Module):
  """Stride-2 3D conv (kernel 3) on the axes asked for: halves T and/or H, W."""

  features: int
  time: bool
  space: bool
  causal: bool = False
  conv_impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    strides = (2 if self.time else 1, 2 if self.space else 1, 2 if self.space else 1)
    return Conv3D(self.features, (3, 3, 3), strides, causal=self.causal,
                  conv_impl=self.conv_impl, dtype=self.dtype)(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 on the axes asked for, then a 3D conv (``Conv3D``'s ``upsample``).

  Causal time upsampling drops the first repeated frame (:func:`repeat_x2`): the first latent
  frame stands for the first video frame alone.
  """

  features: int
  time: bool
  space: bool
  causal: bool = False
  conv_impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Conv3D(self.features, (3, 3, 3), causal=self.causal, conv_impl=self.conv_impl,
                  dtype=self.dtype, upsample=(self.time, self.space, self.space))(x)


def frame_causal_mask(num_frames: int, tokens_per_frame: int) -> jax.Array:
  """``[N, N]`` boolean mask, N = T * tokens_per_frame: a token sees tokens of frames <= its own."""
  frame_index = jnp.repeat(jnp.arange(num_frames), tokens_per_frame)
  return frame_index[:, None] >= frame_index[None, :]


class SelfAttention(nn.Module):
  """Multi-head self-attention over a token sequence ``[N, L, C]`` with an optional mask.

  Goes through ``jax.nn.dot_product_attention``; ``attention_impl`` picks its kernel
  ('xla', 'cudnn' or 'auto', see ``models/attention.py``).
  """

  num_heads: int = 1
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    channels = tokens.shape[-1]
    if channels % self.num_heads:
      raise ValueError(f"{channels} channels do not split into {self.num_heads} attention heads.")
    head_dim = channels // self.num_heads
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype, name="qkv")(tokens)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, L, heads, head_dim]
    attention_mask = None if mask is None else mask[None, None]
    implementation = resolve_attention_impl(self.attention_impl, query.dtype, head_dim,
                                             tokens.shape[1], mask is not None)
    out = jax.nn.dot_product_attention(query, key, value, mask=attention_mask,
                                       implementation=implementation)
    return nn.DenseGeneral(channels, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class AttentionBlock3D(nn.Module):
  """Norm -> self-attention over every (t, h, w) position -> residual; frame-causal if asked."""

  num_heads: int = 1
  num_groups: int = 32
  causal: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, frames, height, width, _ = x.shape
    h = Normalize(self.num_groups, self.causal)(x)
    tokens = einops.rearrange(h, "b t h w c -> b (t h w) c")
    mask = frame_causal_mask(frames, height * width) if self.causal else None
    out = SelfAttention(self.num_heads, self.dtype, self.attention_impl)(tokens, mask)
    out = einops.rearrange(out, "b (t h w) c -> b t h w c", t=frames, h=height, w=width)
    return x + out
