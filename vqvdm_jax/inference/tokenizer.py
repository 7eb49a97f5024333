"""A trained stage-1 tokenizer: videos <-> quantized latents and code indices.

:func:`load_tokenizer` rebuilds the 3D VQGAN from a workdir's recorded config and reads only
its weights (the EMA copy when the run kept one) and quantizer state from the latest (or a
chosen) checkpoint: no discriminator, no optimizer, no trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqvdm_jax import checkpointing, fileio, runtime, sharding
from vqvdm_jax import config as config_lib
from vqvdm_jax import workdir as workdir_lib
from vqvdm_jax.data import pipeline
from vqvdm_jax.models.vqgan import make_vqgan

PyTree = Any


def weights_field(config: ml_collections.ConfigDict) -> str:
  """The saved weights evaluation and sampling use: the EMA copy when the run kept one."""
  return "ema_params" if config.vqgan.optim.ema_decay > 0 else "params"


def dummy_video(config: ml_collections.ConfigDict, batch_size: int = 1) -> jax.Array:
  data = config.data
  return jnp.zeros((batch_size, data.num_frames, data.resolution, data.resolution, 3),
                   jnp.float32)


def init_variables(config: ml_collections.ConfigDict, model: nn.Module, rng: jax.Array) -> PyTree:
  """The VQGAN's initial ``{'params', 'quantizer_state'}``."""
  init_rng, quantizer_rng = jax.random.split(rng)
  variables = model.init({"params": init_rng, "quantizer": quantizer_rng}, dummy_video(config))
  return {"params": variables["params"],
          "quantizer_state": variables.get("quantizer_state", {})}


@config_lib.per_config
def abstract_variables(config: ml_collections.ConfigDict) -> PyTree:
  """The shapes of :func:`init_variables`, traced once per config."""
  model = make_vqgan(config)
  return jax.eval_shape(lambda: init_variables(config, model, jax.random.PRNGKey(0)))


# What no tokenizer program reads: stage 1's training and evaluation, and the later stages (of
# the diffusion section only the latents' source counts).
PROGRAM_IGNORES = (
    "vqgan.train", "vqgan.eval", "vqgan.loss", "vqgan.optim", "vqgan.discriminator",
    *(f"diffusion.{name}" for name in (
        "unet", "schedule", "sample", "optim", "train", "prediction", "loss_weighting",
        "min_snr_gamma", "class_drop_rate", "use_class", "use_fps", "latents.encode_batch_size",
        "latents.scale_estimate_clips", "latents.center")),
    "transformer", "stage2", "evaluation", "run", "mesh", "seed")


class TokenizerPrograms(NamedTuple):
  """A tokenizer's jitted functions of ``(variables, input)``."""

  encode: Callable[..., jax.Array]  # uint8 videos -> quantized latents
  for_diffusion: Callable[..., jax.Array]  # uint8 videos -> the latents stage 2 learns
  decode_latents: Callable[..., jax.Array]  # latents -> uint8 videos
  encode_indices: Callable[..., Any]  # uint8 videos -> code indices
  decode_indices: Callable[..., jax.Array]  # code indices -> uint8 videos


@config_lib.per_config(copies=False, ignoring=PROGRAM_IGNORES)
def compiled_programs(config: ml_collections.ConfigDict) -> TokenizerPrograms:
  """The config's tokenizer's jitted encoders and decoders, built once per process for each
  config (every tokenizer of the config shares them, whatever its weights)."""
  return build_programs(config, make_vqgan(config))


def build_programs(config: ml_collections.ConfigDict, model: nn.Module) -> TokenizerPrograms:
  """``model``'s jitted encoders and decoders (``config`` sets which latents stage 2 learns)."""
  quantize_latents = config.diffusion.latents.source == "quantized"

  def quantize(variables, latent):
    return model.apply(variables, latent, method="quantize").quantized

  def to_video(variables, quantized):
    return pipeline.to_uint8(model.apply(variables, quantized, method="decode"))

  def encoder_latent(variables, video_uint8):
    return model.apply(variables, pipeline.to_model_input(video_uint8), method="encode")

  def for_diffusion(variables, video_uint8):
    latent = encoder_latent(variables, video_uint8)
    return quantize(variables, latent) if quantize_latents else latent

  def snap(variables, latent):
    # Quantized latents (a sample of them) lie in code space: snap to the nearest code. For
    # 'vq' that is also what quantize does; FSQ's quantize would tanh-bound them again.
    return model.apply(variables, latent, method="nearest_codes")

  return TokenizerPrograms(
      encode=jax.jit(lambda v, x: quantize(v, encoder_latent(v, x))),
      for_diffusion=jax.jit(for_diffusion),
      decode_latents=jax.jit(lambda v, z: to_video(
          v, snap(v, z) if quantize_latents else quantize(v, z))),
      encode_indices=jax.jit(lambda v, x: model.apply(
          v, pipeline.to_model_input(x), method="encode_to_indices")),
      decode_indices=jax.jit(lambda v, i: pipeline.to_uint8(model.apply(
          v, i, method="decode_from_indices"))))


class Tokenizer:
  """Stage 1 for users and for stage 2. Videos are uint8 ``[B, T, H, W, 3]``.

  ``encode`` -> quantized latents ``[B, t, h, w, c]``, ``decode`` <- quantized latents (or any
  latents: they are quantized first) or code indices ``[B, t, h, w]``; ``reconstruct`` is
  both. The jitted functions compile once per input shape, shared by every tokenizer of the
  config in the process (:func:`compiled_programs`).
  """

  def __init__(self, config: ml_collections.ConfigDict, params: PyTree,
               quantizer_state: PyTree, step: int, model: nn.Module | None = None):
    self.config, self.step = config, step
    self.model = make_vqgan(config) if model is None else model
    self.variables = {"params": params, "quantizer_state": quantizer_state}
    # A model built from the config shares the config's programs (modules holding a
    # ConfigDict cannot be a cache key); any other model gets its own.
    programs = (compiled_programs(config) if self.model == make_vqgan(config)
                else build_programs(config, self.model))
    self._encode, self._for_diffusion, self._decode_latents = (
        programs.encode, programs.for_diffusion, programs.decode_latents)
    self._encode_indices, self._decode_indices = programs.encode_indices, programs.decode_indices

  def encode(self, videos: np.ndarray) -> np.ndarray:
    """uint8 videos ``[B, T, H, W, 3]`` -> quantized latents ``[B, t, h, w, c]`` float32."""
    return np.asarray(jax.device_get(self._encode(self.variables, _videos(videos))))

  def encode_to_indices(self, videos: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
    """uint8 videos -> code indices ``[B, t, h, w]`` int32 (two levels: a dict of ``'bottom'``
    and ``'top'`` indices)."""
    indices = jax.device_get(self._encode_indices(self.variables, _videos(videos)))
    return jax.tree.map(np.asarray, indices)

  def decode(self, codes: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
    """Latents ``[B, t, h, w, c]`` (quantized first) or indices ``[B, t, h, w]`` (two levels: the
    dict :meth:`encode_to_indices` returns) -> uint8 videos."""
    if isinstance(codes, dict):
      return np.asarray(jax.device_get(self._decode_indices(self.variables, codes)))
    codes = np.asarray(codes)
    if np.issubdtype(codes.dtype, np.integer):
      return np.asarray(jax.device_get(self._decode_indices(self.variables, codes)))
    return np.asarray(jax.device_get(self.decode_latents(codes)))

  def reconstruct(self, videos: np.ndarray) -> np.ndarray:
    """uint8 videos -> encoded, quantized and decoded uint8 videos."""
    return self.decode(self.encode(videos))

  def encode_for_diffusion(self, videos: np.ndarray) -> np.ndarray:
    """uint8 clips -> the latents stage 2 learns (``diffusion.latents.source``)."""
    return np.asarray(jax.device_get(self._for_diffusion(self.variables, _videos(videos))))

  def decode_latents(self, latent: jax.Array) -> jax.Array:
    """Unscaled latents -> quantized -> decoded uint8 clips (VQ-VDM's sampling path), on device."""
    return self._decode_latents(self.variables, latent)


def _videos(videos: np.ndarray) -> jax.Array:
  videos = np.asarray(videos)
  if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
    raise ValueError(f"Expected uint8 videos [B, T, H, W, 3], got {videos.dtype} "
                     f"{videos.shape}.")
  return jnp.asarray(videos)


def resolve_config(workdir: fileio.PathLike,
                   config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """``config`` checked against the workdir's record, or the record itself."""
  if config is None:
    config = workdir_lib.read_config(workdir)
    if config is None:
      raise config_lib.MissingCheckpointError(
          f"{workdir} has no {workdir_lib.CONFIG_FILE}: it is not a vqvdm_jax workdir, or it "
          f"was trained before workdirs recorded their config; pass config= (the config it was "
          f"trained with).")
    return config
  workdir_lib.check_or_record_config(config, workdir, write=False)
  return config


def load_tokenizer(workdir: fileio.PathLike, step: int | None = None,
                   config: ml_collections.ConfigDict | None = None,
                   devices: list | None = None, trained_on: int | None = None) -> Tokenizer:
  """The stage-1 tokenizer of ``workdir`` (latest checkpoint, or ``step``), replicated over
  ``devices`` (default: all). ``config`` defaults to the workdir's record. Without ``step``, a
  stage-2 model's ``trained_on`` (the tokenizer step it learned) is taken if still kept."""
  runtime.configure_jax()  # the random-number settings every run uses, so seeds agree
  config = resolve_config(workdir, config)
  if step is None and trained_on is not None:
    kept = checkpointing.checkpoint_steps(workdir_lib.vqgan_dir(workdir) / "checkpoints")
    step = trained_on if trained_on in kept else None
  model = make_vqgan(config)
  abstract = abstract_variables(config)
  field = weights_field(config)
  replicated = sharding.replicated(sharding.make_mesh(config.mesh, devices))
  wanted = {field: abstract["params"], "step": jax.ShapeDtypeStruct((), jnp.int32)}
  if jax.tree.leaves(abstract["quantizer_state"]):
    wanted["quantizer_state"] = abstract["quantizer_state"]
  wanted = sharding.abstract_with_shardings(wanted, sharding.tree_shardings(wanted, replicated))
  directory = workdir_lib.vqgan_dir(workdir) / "checkpoints"
  restored = checkpointing.restore_fields(directory, wanted, step)
  if restored is None:
    raise config_lib.MissingCheckpointError(
        f"{workdir} has no stage-1 checkpoint (in {directory}); train the tokenizer first: "
        f"python -m vqvdm_jax.main --workdir={workdir} --mode=train_vqgan")
  fields, step = restored
  return Tokenizer(config, fields[field], fields.get("quantizer_state", {}), step, model)
