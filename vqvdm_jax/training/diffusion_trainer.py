"""Stage 2: the latent DDPM with the spatio-temporal 3D U-Net (VQ-VDM §3.2, eqs. 7-8).

L = E ‖target − model(z_t, t, f, c)‖², target = ε (Ho et al. 2020) or v (Salimans & Ho), with
the class replaced by the null label at rate ρ (joint training for classifier-free guidance).
Latents come from the cache of :mod:`vqvdm_jax.data.latents`, multiplied by its scale factor.
Workdir layout (stage 2): ``diffusion/checkpoints``, ``diffusion/summaries``, ``diffusion/latents``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vqvdm_jax import checkpointing, fileio, sharding, video_io
from vqvdm_jax import config as config_lib
from vqvdm_jax import workdir as workdir_lib
from vqvdm_jax.data import latents as latents_lib
from vqvdm_jax.diffusion import schedule as schedule_lib
from vqvdm_jax.diffusion.model import apply_unet, make_schedule, make_unet, null_label
from vqvdm_jax.inference import sampling
from vqvdm_jax.inference.model import VideoModel, init_unet_params
from vqvdm_jax.inference.tokenizer import load_tokenizer
from vqvdm_jax.models.unet3d import UNet3D
from vqvdm_jax.training import loop
from vqvdm_jax.training.optimizers import learning_rate_schedule, make_optimizer

PyTree = Any


@flax.struct.dataclass
class DiffusionTrainState:
  step: jax.Array
  params: PyTree
  ema_params: PyTree  # sampling uses these
  opt_state: PyTree
  rng: jax.Array  # base key; step keys are fold_in(rng, step)
  scale_factor: jax.Array  # latents are multiplied by it (scale_by_std), fixed at stage-2 start
  latent_shift: jax.Array  # [c], subtracted before scaling (0 unless diffusion.latents.center)
  tokenizer_step: jax.Array  # the stage-1 checkpoint whose latents this model learned
  nonfinite_streak: jax.Array  # consecutive skipped (non-finite) updates up to this step


def drop_labels(labels: jax.Array, rate: float, null: int, rng: jax.Array) -> jax.Array:
  """Classifier-free guidance training: each label becomes the null label with probability ρ."""
  return jnp.where(jax.random.bernoulli(rng, rate, labels.shape), null, labels)


def make_train_step(config: ml_collections.ConfigDict, unet: UNet3D,
                    schedule: schedule_lib.DiffusionSchedule, tx: optax.GradientTransformation):
  """The pure step ``(state, batch) -> (state, metrics)``; batch = {latent, label, fps}."""
  diffusion = config.diffusion
  apply_fn = apply_unet(unet, config)
  ema_decay = diffusion.optim.ema_decay

  def train_step(state: DiffusionTrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    time_rng, noise_rng, label_rng, dropout_rng = jax.random.split(rng, 4)
    z0 = latents_lib.to_model_space(batch["latent"], state.latent_shift, state.scale_factor)
    batch_size = z0.shape[0]
    t = jax.random.randint(time_rng, (batch_size,), 0, schedule.num_steps)
    noise = jax.random.normal(noise_rng, z0.shape, z0.dtype)
    z_t = schedule_lib.q_sample(schedule, z0, t, noise)
    target = schedule_lib.training_target(schedule, z0, t, noise, diffusion.prediction)
    labels = drop_labels(batch["label"], diffusion.class_drop_rate, null_label(config), label_rng)
    weights = schedule_lib.loss_weight(schedule, t, diffusion.prediction,
                                       diffusion.loss_weighting, diffusion.min_snr_gamma)

    def loss_fn(params):
      output = apply_fn(params, z_t, t, batch["fps"], labels, train=True,
                        rngs={"dropout": dropout_rng})
      squared_error = jnp.mean((output.astype(jnp.float32) - target) ** 2,
                               axis=tuple(range(1, target.ndim)))
      return jnp.mean(weights * squared_error)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    metrics = {"loss/diffusion": loss, "grad_norm/unet": optax.tree.norm(grads),
               "conditioning/null_label_rate": jnp.mean(labels == null_label(config))}
    new_state = loop.apply_gradients(state, grads, tx, ema_decay)
    return loop.finish_step(new_state, state, metrics, loss, metrics["grad_norm/unet"])

  return train_step


def make_stage2_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  optim = config.diffusion.optim
  return make_optimizer(optim.learning_rate, optim, config.diffusion.train.num_steps)


def init_state(config: ml_collections.ConfigDict, unet: UNet3D, tx: optax.GradientTransformation,
               latent_shape: tuple[int, ...], scale_factor, latent_shift, tokenizer_step: int
               ) -> DiffusionTrainState:
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed + 1))
  params = init_unet_params(config, unet, latent_shape, init_rng)
  return DiffusionTrainState(
      step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
      opt_state=tx.init(params), rng=state_rng,
      scale_factor=jnp.asarray(scale_factor, jnp.float32),
      latent_shift=jnp.asarray(latent_shift, jnp.float32),
      tokenizer_step=jnp.asarray(tokenizer_step, jnp.int32),
      nonfinite_streak=jnp.zeros((), jnp.int32))


def program_ignores(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """What no stage-2 program reads: the loop's (:func:`loop.unread_fields`), sampling, the
  latent cache (the step sees latents, shift and scale as values), the tokenizer's training and
  the token priors."""
  return loop.unread_fields(config, "diffusion", "diffusion.train.sample_every",
                            "diffusion.sample", "diffusion.latents", "vqgan", "transformer",
                            "stage2")


@config_lib.per_config(ignoring=program_ignores)
def abstract_state(config: ml_collections.ConfigDict, latent_shape: tuple[int, ...]
                   ) -> DiffusionTrainState:
  """The shapes of a fresh stage-2 state, traced once per config and latent shape."""
  return jax.eval_shape(functools.partial(
      init_state, config, make_unet(config), make_stage2_optimizer(config), latent_shape, 1.0,
      np.zeros(latent_shape[-1], np.float32), 0))


@config_lib.per_config(copies=False, ignoring=program_ignores)
def compiled_programs(config: ml_collections.ConfigDict, latent_shape: tuple[int, ...],
                      mesh: jax.sharding.Mesh) -> loop.CompiledRun:
  """The jitted init and train step of a stage-2 run on ``mesh``, built once per process for
  each config and latent shape (every trainer of the config shares them)."""
  unet, tx = make_unet(config), make_stage2_optimizer(config)
  # The tokenizer step is an argument, not a constant: one compiled init serves every step.
  return loop.compile_run(config, mesh, abstract_state(config, latent_shape),
                          functools.partial(init_state, config, unet, tx, latent_shape),
                          make_train_step(config, unet, make_schedule(config), tx))


class DiffusionTrainer:
  """Model, optimizer, mesh, jitted step and checkpointer of a stage-2 run."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: fileio.PathLike,
               latent_shape: tuple[int, ...], devices: list | None = None):
    config_lib.validate(config)
    self.config = config
    self.workdir = workdir_lib.diffusion_dir(workdir)
    self.latent_shape = tuple(latent_shape)  # [t, h, w, c]
    self.mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_size(config.diffusion.train.batch_size, self.mesh,
                              "diffusion.train.batch_size")
    self.unet = make_unet(config)
    self.schedule = make_schedule(config)
    train = config.diffusion.train
    self.checkpointer = checkpointing.Checkpointer(
        self.workdir / "checkpoints", train.checkpoint_every, train.keep_checkpoints,
        config.run.async_checkpoints)
    programs = compiled_programs(config, self.latent_shape, self.mesh)
    self.state_sharding = programs.state_sharding
    self._abstract_state = programs.abstract_state
    self._init = programs.init
    self.train_step = programs.train_step

  def _zero_shift(self) -> np.ndarray:
    return np.zeros(self.latent_shape[-1], np.float32)

  def initial_state(self, scale_factor: float, tokenizer_step: int,
                    latent_shift: np.ndarray | None = None) -> DiffusionTrainState:
    if latent_shift is None:
      latent_shift = self._zero_shift()
    return self._init(scale_factor, latent_shift, tokenizer_step)

  def abstract_state(self) -> DiffusionTrainState:
    return self._abstract_state

  def restore(self, data_iterator: Any | None = None) -> DiffusionTrainState | None:
    return self.checkpointer.restore(self.abstract_state(), data_iterator)

  def step(self, state: DiffusionTrainState, batch: dict[str, np.ndarray]):
    return self.train_step(state, sharding.shard_batch(batch, self.mesh))


def train_diffusion(config: ml_collections.ConfigDict, workdir: fileio.PathLike,
                    deadline: float | None = None) -> DiffusionTrainState:
  """Trains stage 2 to ``diffusion.train.num_steps`` (or to the last step that fits before
  ``deadline``: :mod:`vqvdm_jax.training.loop`) on the latest stage-1 tokenizer's latents.

  Like stage 1, checks the config against the workdir's record, or records it.
  """
  workdir_lib.check_or_record_config(config, workdir, write=jax.process_index() == 0)
  tokenizer = load_tokenizer(workdir, config=config)
  cache = latents_lib.build_or_load(config, workdir, tokenizer.step,
                                    tokenizer.encode_for_diffusion)
  trainer = DiffusionTrainer(config, workdir, cache.latent_shape)
  train, optim = config.diffusion.train, config.diffusion.optim
  data_iterator = latents_lib.train_iterator(cache, train.batch_size, config.seed)
  state = trainer.restore(data_iterator)
  if state is None:
    shift, scale = latents_lib.normalization(
        cache.latents[:config.diffusion.latents.scale_estimate_clips],
        config.diffusion.latents.center)
    state = trainer.initial_state(scale, tokenizer.step, shift)
  elif int(state.tokenizer_step) != tokenizer.step:
    logging.warning("Stage 2 resumes a model trained on tokenizer step %d latents; the latest "
                    "tokenizer is step %d. Continuing with the model's own scale factor.",
                    int(state.tokenizer_step), tokenizer.step)
  start_step = int(jax.device_get(state.step))
  if loop.nothing_to_train("Stage 2", start_step, train.num_steps, trainer.checkpointer,
                           budgeted=deadline is not None):
    trainer.checkpointer.close()
    return state
  logging.info("Stage 2: training from step %d to %d on %d device(s); latents %s, scale %.4f.",
               start_step, train.num_steps, trainer.mesh.size, cache.latent_shape,
               float(state.scale_factor))

  def write_progress_samples(step: int, state: DiffusionTrainState, writer, final: bool
                             ) -> None:
    if train.sample_every and step % train.sample_every == 0 and not final:
      model = VideoModel(config, tokenizer, state.ema_params, state.scale_factor,
                         state.latent_shift, step, trainer.mesh, trainer.unet, trainer.schedule)
      out_dir = sampling.write_samples(model, trainer.workdir / "progress" / f"step_{step:07d}")
      if jax.process_index() == 0:  # TensorBoard: each sample's middle frame
        with (out_dir / "videos.npz").open("rb") as file:
          videos = np.load(file)["videos"]
        middle = videos.shape[1] // 2
        writer.write_images(step, {"samples": video_io.video_grid(
            videos[:, middle:middle + 1], columns=min(8, len(videos)))})

  return loop.train_loop(
      stage="Stage 2", state=state, step_fn=trainer.step, data_iterator=data_iterator,
      checkpointer=trainer.checkpointer, num_steps=train.num_steps, log_every=train.log_every,
      batch_size=train.batch_size, summary_dir=trainer.workdir / "summaries",
      max_nonfinite_skips=config.run.max_nonfinite_skips,
      learning_rate_field="diffusion.optim.learning_rate", config=config,
      headline=("loss/diffusion", "grad_norm/unet"), on_step=write_progress_samples,
      learning_rates={"unet": learning_rate_schedule(optim.learning_rate, optim,
                                                     train.num_steps)},
      deadline=deadline, budget_minutes=config.run.time_budget_minutes)
