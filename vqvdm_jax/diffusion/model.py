"""The stage-2 model as the config describes it: U-Net, noise schedule and how it is called.

Training, sampling, evaluation and the benchmarks build the model here, so none of them needs
the others (nor their data and checkpoint dependencies) to run it.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from vqvdm_jax.diffusion import schedule as schedule_lib
from vqvdm_jax.models.unet3d import UNet3D


def null_label(config: ml_collections.ConfigDict) -> int:
  """The extra class index meaning "no class" (classifier-free guidance)."""
  return config.data.num_classes


def make_unet(config: ml_collections.ConfigDict) -> UNet3D:
  unet = config.diffusion.unet
  return UNet3D(
      channels=unet.channels, channel_multipliers=tuple(unet.channel_multipliers),
      num_res_blocks=unet.num_res_blocks, attention_levels=tuple(unet.attention_levels),
      num_heads=unet.num_heads, dropout=unet.dropout, num_groups=unet.num_groups,
      num_classes=config.data.num_classes if config.diffusion.use_class else 0,
      use_fps=config.diffusion.use_fps, conv_impl=unet.conv_impl, dtype=jnp.dtype(unet.dtype),
      remat=unet.remat, attention_impl=unet.attention_impl, scale_shift=unet.scale_shift_norm)


def make_schedule(config: ml_collections.ConfigDict) -> schedule_lib.DiffusionSchedule:
  sched = config.diffusion.schedule
  return schedule_lib.make_schedule(sched.kind, sched.num_steps, sched.beta_start,
                                    sched.beta_end, sched.cosine_s)


def apply_unet(unet: UNet3D, config: ml_collections.ConfigDict):
  """``apply_fn(params, z, t, fps, labels)`` that drops what the config does not condition on."""
  use_class, use_fps = config.diffusion.use_class, config.diffusion.use_fps

  def apply_fn(params, z, t, fps, labels, train=False, rngs=None):
    return unet.apply({"params": params}, z, t, fps if use_fps else None,
                      labels if use_class else None, train=train, rngs=rngs)

  return apply_fn
