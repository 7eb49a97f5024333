"""A trained VQ-VDM: the tokenizer and the diffusion model of one workdir, ready to sample.

::

  import vqvdm_jax
  model = vqvdm_jax.load("workdirs/demo")       # EMA weights, config from the workdir
  videos = model.sample(labels=[0, 1], guidance_scale=3.0, sampler="ddim", num_steps=25, seed=0)
  codes = model.tokenizer.encode(videos)        # quantized latents
  recon = model.tokenizer.decode(codes)         # uint8 videos

Loading reads only what sampling needs from the stage-2 checkpoint (EMA weights, latent scale
and shift, step) and from the stage-1 checkpoint (weights, quantizer state): no optimizer, no
discriminator and no trainer is built.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from vqvdm_jax import checkpointing, fileio, runtime, sharding
from vqvdm_jax import config as config_lib
from vqvdm_jax import workdir as workdir_lib
from vqvdm_jax.diffusion.model import make_schedule, make_unet
from vqvdm_jax.diffusion.schedule import DiffusionSchedule
from vqvdm_jax.inference import sampling
from vqvdm_jax.inference.token_model import TokenModel, load_token_model
from vqvdm_jax.inference.tokenizer import Tokenizer, load_tokenizer, resolve_config
from vqvdm_jax.models.unet3d import UNet3D
from vqvdm_jax.models.vqgan import latent_shape as vqgan_latent_shape

PyTree = Any


def init_unet_params(config: ml_collections.ConfigDict, unet: UNet3D,
                     latent_shape: tuple[int, ...], rng: jax.Array) -> PyTree:
  """The U-Net's initial parameters for latents ``[B, *latent_shape]``."""
  z = jnp.zeros((1, *latent_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  fps = jnp.ones((1,), jnp.float32) if config.diffusion.use_fps else None
  labels = jnp.zeros((1,), jnp.int32) if config.diffusion.use_class else None
  return unet.init(rng, z, t, fps, labels)["params"]


@config_lib.per_config
def abstract_unet_params(config: ml_collections.ConfigDict, latent_shape: tuple[int, ...]
                         ) -> PyTree:
  """The shapes of :func:`init_unet_params`, traced once per config and latent shape."""
  unet = make_unet(config)
  return jax.eval_shape(lambda: init_unet_params(config, unet, latent_shape,
                                                 jax.random.PRNGKey(0)))


class VideoModel:
  """A trained tokenizer and diffusion U-Net (its EMA weights), on a device mesh."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer, params: PyTree,
               scale_factor: jax.Array, latent_shift: jax.Array, step: int,
               mesh: Mesh, unet: UNet3D | None = None,
               schedule: DiffusionSchedule | None = None):
    self.config, self.tokenizer, self.params, self.step, self.mesh = (
        config, tokenizer, params, step, mesh)
    self.scale_factor, self.latent_shift = scale_factor, latent_shift
    self.unet = make_unet(config) if unet is None else unet
    self.schedule = make_schedule(config) if schedule is None else schedule
    self.latent_shape = vqgan_latent_shape(config)[1:]
    self._samplers = {}  # config JSON -> compiled sampler: repeated sampling compiles once

  def sample(self, labels: Sequence[int] | int | None = None, fps: float | None = None,
             guidance_scale: float | None = None, sampler: str | None = None,
             num_steps: int | None = None, seed: int | None = None,
             num_videos: int | None = None, **settings) -> np.ndarray:
    """uint8 videos ``[N, T, H, W, 3]``.

    ``labels``: one class per video (or one class for ``num_videos`` videos; default: every
    class in turn, ``sample.num_videos`` of them). Other arguments left out take the values of
    ``config.diffusion.sample`` (also ``eta``, ``batch_size``, ``clip_x0``,
    ``guidance_interval``). The same seed gives the same videos, whatever the batch size or
    devices: video ``i`` draws its noise from its own key (:func:`sampling.generate_batches`).
    """
    one_class = labels is not None and np.ndim(labels) == 0
    config = sampling.sampling_config(
        self.config, label=int(labels) if one_class else None, num_videos=num_videos, fps=fps,
        guidance_scale=guidance_scale, sampler=sampler, num_steps=num_steps, seed=seed,
        **settings)
    sample = config.diffusion.sample
    labels = sampling.resolve_labels(config, None if one_class else labels)
    fps_values = np.full(len(labels), sample.fps, np.float32)
    return np.concatenate(list(self.generate_batches(labels, fps_values, sample.seed, config)))

  def generate_batches(self, labels: np.ndarray, fps: np.ndarray, seed: int,
                       config: ml_collections.ConfigDict | None = None) -> Iterator[np.ndarray]:
    """uint8 videos, one sampling batch at a time (:func:`sampling.generate_batches`)."""
    return sampling.generate_batches(self, labels, fps, seed, config)

  def sampler(self, config: ml_collections.ConfigDict):
    """The jitted sampler of ``config``'s settings and its unscaling, compiled once per model
    and settings (:func:`sampling.compile_sampler`)."""
    key = config_lib.config_key(config)
    if key not in self._samplers:
      self._samplers[key] = sampling.compile_sampler(self, config)
    return self._samplers[key]

  def sampling_settings(self) -> dict[str, Any]:
    """How this model samples, for results files."""
    sample = self.config.diffusion.sample
    return {"prior": "diffusion", "guidance_scale": float(sample.guidance_scale),
            "sampler": sample.sampler, "num_steps": int(sample.num_steps),
            "eta": float(sample.eta)}

  def write_samples(self, out_dir: fileio.PathLike, **settings) -> epath.Path:
    """``--mode=sample``'s output (MP4s, grid.gif, samples.json) with the given settings."""
    return sampling.write_samples(self, out_dir, sampling.sampling_config(self.config,
                                                                          **settings))


def load(workdir: fileio.PathLike, step: int | None = None,
         config: ml_collections.ConfigDict | None = None, devices: list | None = None,
         tokenizer_step: int | None = None) -> VideoModel | TokenModel:
  """The trained model of ``workdir`` (a local path or ``gs://...``): the stage-2 prior that
  ``config.stage2`` names (diffusion, or a :class:`TokenModel` for the token priors).

  ``step`` picks a stage-2 checkpoint (default: the latest) and ``tokenizer_step`` a stage-1
  one (default: the one the diffusion model was trained on, if kept, else the latest).
  ``config`` defaults to the workdir's recorded config; one given must agree with it on every
  model-defining field. The model lives on a mesh over ``devices`` (default: all).
  """
  runtime.configure_jax()  # the random-number settings every run uses, so seeds agree
  config = resolve_config(workdir, config)
  if config.stage2 != "diffusion":  # a token prior: same interface, its own weights
    return load_token_model(workdir, step, config, devices, tokenizer_step)
  mesh = sharding.make_mesh(config.mesh, devices)
  unet = make_unet(config)
  latent_shape = vqgan_latent_shape(config)[1:]
  abstract_params = abstract_unet_params(config, latent_shape)
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)  # noqa: E731
  wanted = {"ema_params": abstract_params, "step": scalar(jnp.int32),
            "scale_factor": scalar(jnp.float32), "tokenizer_step": scalar(jnp.int32),
            "latent_shift": jax.ShapeDtypeStruct((latent_shape[-1],), jnp.float32)}
  shardings = sharding.state_shardings(wanted, mesh, config.mesh.param_sharding,
                                       config.mesh.fsdp_min_size)
  directory = workdir_lib.diffusion_dir(workdir) / "checkpoints"
  restored = checkpointing.restore_fields(
      directory, sharding.abstract_with_shardings(wanted, shardings), step)
  if restored is None:
    raise config_lib.MissingCheckpointError(
        f"{workdir} has no stage-2 checkpoint (in {directory}); train it first: "
        f"python -m vqvdm_jax.main --workdir={workdir} --mode=train_diffusion")
  fields, step = restored
  tokenizer = load_tokenizer(workdir, tokenizer_step, config, devices,
                             trained_on=int(fields["tokenizer_step"]))
  return VideoModel(config, tokenizer, fields["ema_params"], fields["scale_factor"],
                    fields["latent_shift"], step, mesh, unet)
