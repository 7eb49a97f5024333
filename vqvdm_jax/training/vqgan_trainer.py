"""Stage 1: training the 3D VQGAN (VQ-VDM eq. 5) with a pure, jitted GAN step.

One step updates the generator (encoder, quantizer, decoder) and the 3D discriminator, as
MAGVIT does. The objective is

  L = L_recon + λ1 L_vq + [step >= disc_start] (λ2 w L_disc + λ3 L_disc_aux),

with L_recon = ‖x − x̂‖² + LPIPS(x, x̂) and w = 1, or Taming's adaptive weight when asked.
Workdir layout (stage 1): ``vqgan/checkpoints``, ``vqgan/summaries``, ``vqgan/reconstructions``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vqvdm_jax import checkpointing, fileio, losses, sharding, video_io
from vqvdm_jax import config as config_lib
from vqvdm_jax import workdir as workdir_lib
from vqvdm_jax.data import pipeline
from vqvdm_jax.inference import tokenizer as tokenizer_lib
from vqvdm_jax.models.discriminator import Discriminator3D
from vqvdm_jax.models.vqgan import make_vqgan
from vqvdm_jax.training import loop
from vqvdm_jax.training.optimizers import learning_rate_schedule, make_optimizer

PyTree = Any


@flax.struct.dataclass
class VQGANTrainState:
  """Everything a stage-1 run needs to continue bit-identically after a restart."""

  step: jax.Array
  params: PyTree  # generator: encoder, quantizer, decoder
  quantizer_state: PyTree  # non-gradient quantizer variables (EMA codebook, usage counters)
  ema_params: PyTree  # EMA of `params`, used for evaluation
  disc_params: PyTree
  gen_opt_state: PyTree
  disc_opt_state: PyTree
  lecam_ema: PyTree  # EMAs of the discriminator's mean real / fake logits (LeCam)
  rng: jax.Array  # base key; step keys are fold_in(rng, step)
  nonfinite_streak: jax.Array  # consecutive skipped (non-finite) updates up to this step


def make_discriminator(config: ml_collections.ConfigDict) -> Discriminator3D:
  disc = config.vqgan.discriminator
  return Discriminator3D(channels=disc.channels, num_layers=disc.num_layers,
                         conv_impl=config.vqgan.model.conv_impl)


def init_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                     discriminator: Discriminator3D, gen_tx: optax.GradientTransformation,
                     disc_tx: optax.GradientTransformation) -> VQGANTrainState:
  rng = jax.random.PRNGKey(config.seed)
  init_rng, quantizer_rng, disc_rng, state_rng = jax.random.split(rng, 4)
  video = tokenizer_lib.dummy_video(config)
  variables = model.init({"params": init_rng, "quantizer": quantizer_rng}, video)
  params = variables["params"]
  disc_params = discriminator.init(disc_rng, video)["params"]
  return VQGANTrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      quantizer_state=variables.get("quantizer_state", {}),
      ema_params=params,
      disc_params=disc_params,
      gen_opt_state=gen_tx.init(params),
      disc_opt_state=disc_tx.init(disc_params),
      lecam_ema={"real": jnp.zeros((), jnp.float32), "fake": jnp.zeros((), jnp.float32)},
      rng=state_rng, nonfinite_streak=jnp.zeros((), jnp.int32))


def make_stage1_optimizers(config: ml_collections.ConfigDict
                           ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """The generator's and the discriminator's optimizers."""
  optim, num_steps = config.vqgan.optim, config.vqgan.train.num_steps
  return (make_optimizer(optim.learning_rate, optim, num_steps),
          make_optimizer(optim.disc_learning_rate, optim, num_steps))


def gan_in_run(config: ml_collections.ConfigDict) -> bool:
  """Whether the run reaches ``disc_start``: one that ends before it (the demo) builds its train
  step without the discriminator at all, instead of skipping it at run time."""
  return config.vqgan.loss.disc_start < config.vqgan.train.num_steps


def program_ignores(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """What no stage-1 program reads: the loop's (:func:`loop.unread_fields`), evaluation and the
  later stages. The run's length only through :func:`gan_in_run`: a run that ends before
  ``disc_start`` keys its programs by its length too."""
  ignores = loop.unread_fields(config, "vqgan", "vqgan.train.eval_every",
                               "vqgan.train.num_eval_videos", "vqgan.eval", "diffusion",
                               "transformer", "stage2")
  return ignores if gan_in_run(config) else tuple(
      field for field in ignores if field != "vqgan.train.num_steps")


@config_lib.per_config(ignoring=program_ignores)
def abstract_train_state(config: ml_collections.ConfigDict) -> VQGANTrainState:
  """The shapes of :func:`init_train_state`, traced once per config."""
  return jax.eval_shape(functools.partial(init_train_state, config, make_vqgan(config),
                                          make_discriminator(config),
                                          *make_stage1_optimizers(config)))


def uses_lpips(config: ml_collections.ConfigDict) -> bool:
  """Whether the generator loss has an LPIPS term; without one, VGG is never loaded or run."""
  return config.vqgan.loss.lpips_weight != 0


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    discriminator: Discriminator3D, gen_tx: optax.GradientTransformation,
                    disc_tx: optax.GradientTransformation, lpips_module: nn.Module | None
                    ) -> Callable[[VQGANTrainState, dict, PyTree], tuple[VQGANTrainState, dict]]:
  """The pure step ``(state, batch, lpips_params) -> (state, metrics)``; jit it once."""
  loss_config = config.vqgan.loss
  ema_decay = config.vqgan.optim.ema_decay
  with_lpips = uses_lpips(config)
  # Before disc_start the GAN terms are zero and the discriminator stays put; a run that never
  # reaches it leaves them out of the program, which compiles faster (benchmarks/RESULTS.md).
  with_gan = gan_in_run(config)

  def gan_terms(disc_params, video, x_hat):
    """(L_disc, L_disc_aux) of the generator: VQ-VDM eqs. 3 and 4 on the reconstruction."""
    logits_fake, features_fake = discriminator.apply({"params": disc_params}, x_hat)
    _, features_real = discriminator.apply({"params": disc_params}, video)
    return (losses.generator_adversarial_loss(logits_fake, loss_config.gan_loss),
            losses.feature_matching_loss(features_real, features_fake))

  def generator_forward(params, quantizer_state, video, quantizer_rng):
    """((x̂, L_VQ), (the quantizer's output, its updated state)): the tokenizer's half of the
    generator loss, differentiated once per step (:func:`jax.vjp`)."""
    (x_hat, quantized), updated = model.apply(
        {"params": params, "quantizer_state": quantizer_state}, video, train=True,
        mutable=["quantizer_state"], rngs={"quantizer": quantizer_rng})
    return (x_hat, quantized.loss), (quantized, updated.get("quantizer_state", {}))

  def loss_heads(x_hat, disc_params, lpips_params, video, lpips_rng, gan_active):
    """((L_rec, L_disc, L_disc_aux), (L2, LPIPS)) of the reconstruction x̂; the discriminator
    only runs once the GAN is active."""
    l2 = losses.l2_reconstruction_loss(video, x_hat)
    zero = jnp.zeros((), jnp.float32)
    if with_lpips:
      perceptual = losses.video_lpips(lpips_module, lpips_params, video, x_hat,
                                      loss_config.lpips_frames, lpips_rng)
    else:  # lpips_weight=0: VGG is neither built into the step nor run (reported as 0)
      perceptual = zero
    reconstruction = loss_config.l2_weight * l2 + loss_config.lpips_weight * perceptual
    # lax.cond, not a 0/1 gate: before disc_start (10k steps by default) the discriminator's
    # forward and backward passes are skipped instead of computed and multiplied by zero.
    if with_gan:
      adversarial, feature_matching = jax.lax.cond(
          gan_active, lambda x: gan_terms(disc_params, video, x), lambda x: (zero, zero), x_hat)
    else:
      adversarial = feature_matching = zero
    return (reconstruction, adversarial, feature_matching), (l2, perceptual)

  def generator_gradients(state, video, lpips_params, rng, gan_active):
    """(the generator loss, its gradient, its terms and λ): one forward pass of the tokenizer and
    of the loss heads, whatever ``adaptive_disc_weight`` says.

    The loss is linear in its heads, so its gradient is the tokenizer's pullback of
    ∂L/∂x̂ = ∂L_rec/∂x̂ + w_disc λ ∂L_disc/∂x̂ + w_aux ∂L_disc_aux/∂x̂ (and of w_VQ for L_VQ).
    Taming's λ (eq. 7) needs ∇_{G_L} of L_rec and of L_disc alone at the decoder's last layer:
    the tokenizer's pullbacks of each head's ∂/∂x̂, of which XLA keeps only what reaches that
    layer (before, each was a gradient of its own forward pass of the whole model).
    """
    lpips_rng, quantizer_rng = jax.random.split(rng)
    (x_hat, vq_loss), pull_generator, (quantized, quantizer_state) = jax.vjp(
        lambda params: generator_forward(params, state.quantizer_state, video, quantizer_rng),
        state.params, has_aux=True)
    (reconstruction, adversarial, feature_matching), pull_heads, (l2, perceptual) = jax.vjp(
        lambda x: loss_heads(x, state.disc_params, lpips_params, video, lpips_rng, gan_active),
        x_hat, has_aux=True)
    zero, one = jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32)
    fm_weight = jnp.asarray(loss_config.feature_matching_weight, jnp.float32)
    if loss_config.adaptive_disc_weight and with_gan:
      # Each head's ∂/∂x̂ alone (before disc_start the discriminator's are zeros and cost
      # nothing), λ from their pullbacks to the last layer, ∂L/∂x̂ as their weighted sum. Not
      # inside a lax.cond: XLA then no longer prunes those pullbacks to the last layer, and the
      # demo's step ran two whole backward passes more (659 against 326 ms).
      (d_reconstruction,), (d_adversarial,), (d_feature_matching,) = (
          pull_heads(cotangents) for cotangents in
          ((one, zero, zero), (zero, one, zero), (zero, zero, one)))

      def last_layer_grad(d_x_hat):
        grads, = pull_generator((d_x_hat, zero))
        return grads["decoder"]["conv_out"]["kernel"]

      disc_factor = jnp.where(gan_active, losses.adaptive_disc_weight(
          last_layer_grad(d_reconstruction), last_layer_grad(d_adversarial),
          loss_config.adaptive_weight_max), one)
      adversarial_weight = loss_config.disc_weight * disc_factor
      d_x_hat = (d_reconstruction + adversarial_weight.astype(x_hat.dtype) * d_adversarial
                 + fm_weight.astype(x_hat.dtype) * d_feature_matching)
    else:
      disc_factor = one
      adversarial_weight = loss_config.disc_weight * disc_factor
      d_x_hat, = pull_heads((one, adversarial_weight, fm_weight))
    total = (reconstruction + loss_config.vq_weight * vq_loss + adversarial_weight * adversarial
             + fm_weight * feature_matching)
    grads, = pull_generator((d_x_hat, jnp.asarray(loss_config.vq_weight, vq_loss.dtype)))
    terms = dict(x_hat=x_hat, quantized=quantized, quantizer_state=quantizer_state, l2=l2,
                 lpips=perceptual, reconstruction=reconstruction, adversarial=adversarial,
                 feature_matching=feature_matching, disc_factor=disc_factor)
    return total, grads, terms

  def discriminator_update(state, video, x_hat):
    """One discriminator step on (x, x̂): its params, optimizer state, LeCam EMAs and metrics."""
    def discriminator_objective(disc_params):
      logits_real, _ = discriminator.apply({"params": disc_params}, video)
      logits_fake, _ = discriminator.apply({"params": disc_params}, x_hat)
      loss = losses.discriminator_loss(logits_real, logits_fake, loss_config.gan_loss)
      lecam = losses.lecam_regularization(logits_real, logits_fake, state.lecam_ema["real"],
                                          state.lecam_ema["fake"])
      return loss + loss_config.lecam_weight * lecam, (loss, lecam, logits_real, logits_fake)

    (_, (disc_loss, lecam, logits_real, logits_fake)), disc_grads = jax.value_and_grad(
        discriminator_objective, has_aux=True)(state.disc_params)
    disc_updates, disc_opt_state = disc_tx.update(disc_grads, state.disc_opt_state,
                                                  state.disc_params)
    lecam_ema = {
        "real": losses.update_lecam_ema(state.lecam_ema["real"], logits_real,
                                        loss_config.lecam_ema_decay),
        "fake": losses.update_lecam_ema(state.lecam_ema["fake"], logits_fake,
                                        loss_config.lecam_ema_decay)}
    disc_metrics = {"loss/discriminator": disc_loss, "loss/lecam": lecam,
                    "gan/logits_real": jnp.mean(logits_real),
                    "gan/logits_fake": jnp.mean(logits_fake),
                    "grad_norm/discriminator": optax.tree.norm(disc_grads)}
    return (optax.apply_updates(state.disc_params, disc_updates), disc_opt_state, lecam_ema,
            disc_metrics)

  def frozen_discriminator(state, video, x_hat):
    """Before disc_start: the discriminator, its optimizer and EMAs stay put, and cost nothing."""
    del video, x_hat
    disc_metrics = {name: jnp.zeros((), jnp.float32) for name in (
        "loss/discriminator", "loss/lecam", "gan/logits_real", "gan/logits_fake",
        "grad_norm/discriminator")}
    return state.disc_params, state.disc_opt_state, state.lecam_ema, disc_metrics

  def train_step(state: VQGANTrainState, batch: dict, lpips_params: PyTree):
    rng = jax.random.fold_in(state.rng, state.step)
    gen_rng = jax.random.split(rng)[0]  # the first of two: the same stream as ever
    video = pipeline.to_model_input(batch["video"])
    gan_active = state.step >= loss_config.disc_start

    gan_gate = gan_active.astype(jnp.float32)
    gen_loss, gen_grads, terms = generator_gradients(state, video, lpips_params, gen_rng,
                                                     gan_active)
    updates, gen_opt_state = gen_tx.update(gen_grads, state.gen_opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if ema_decay > 0:
      ema_params = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
    else:
      ema_params = params

    disc_inputs = (state, video, jax.lax.stop_gradient(terms["x_hat"]))
    if with_gan:
      disc_params, disc_opt_state, lecam_ema, disc_metrics = jax.lax.cond(
          gan_active, discriminator_update, frozen_discriminator, *disc_inputs)
    else:
      disc_params, disc_opt_state, lecam_ema, disc_metrics = frozen_discriminator(*disc_inputs)

    quantized = terms["quantized"]
    metrics = {
        "loss/generator": gen_loss, "loss/l2": terms["l2"], "loss/lpips": terms["lpips"],
        "loss/reconstruction": terms["reconstruction"], "loss/vq": quantized.loss,
        "loss/adversarial": terms["adversarial"],
        "loss/feature_matching": terms["feature_matching"],
        "gan/active": gan_gate, "gan/adaptive_weight": terms["disc_factor"],
        "grad_norm/generator": optax.tree.norm(gen_grads),
        **disc_metrics,
    }
    metrics.update({f"quantizer/{k}": v for k, v in quantized.terms.items()})
    metrics.update({f"codebook/{k}": v for k, v in quantized.stats.items()})
    new_state = state.replace(
        step=state.step + 1, params=params, quantizer_state=terms["quantizer_state"],
        ema_params=ema_params, disc_params=disc_params, gen_opt_state=gen_opt_state,
        disc_opt_state=disc_opt_state, lecam_ema=lecam_ema)
    finite = loop.all_finite(gen_loss, metrics["loss/discriminator"],
                             metrics["grad_norm/generator"], metrics["grad_norm/discriminator"])
    metrics["nonfinite/skipped"] = 1.0 - finite.astype(jnp.float32)
    return loop.skip_nonfinite_update(finite, new_state, state), metrics

  return train_step


@config_lib.per_config(copies=False, ignoring=program_ignores)
def compiled_programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                      lpips_module: nn.Module | None) -> loop.CompiledRun:
  """The jitted init, train step and reconstruction of a stage-1 run on ``mesh``, built once
  per process for each config (every trainer of the config shares them)."""
  model, discriminator = make_vqgan(config), make_discriminator(config)
  gen_tx, disc_tx = make_stage1_optimizers(config)

  def reconstruct(params, quantizer_state, video_uint8):
    return model.apply({"params": params, "quantizer_state": quantizer_state},
                       pipeline.to_model_input(video_uint8), train=False)

  return loop.compile_run(
      config, mesh, abstract_train_state(config),
      functools.partial(init_train_state, config, model, discriminator, gen_tx, disc_tx),
      make_train_step(config, model, discriminator, gen_tx, disc_tx, lpips_module),
      replicated_step_args=1, reconstruct=jax.jit(reconstruct))


class VQGANTrainer:
  """Builds the model, optimizers, mesh, jitted step and checkpointer of a stage-1 run."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: fileio.PathLike,
               devices: list | None = None):
    config_lib.validate(config)
    self.config = config
    self.workdir = workdir_lib.vqgan_dir(workdir)
    self.mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_size(config.vqgan.train.batch_size, self.mesh, "vqgan.train.batch_size")
    self.model = make_vqgan(config)
    # The VGG weights (~60 MB) only when the loss reads them; else an empty tree.
    self.lpips_module, lpips_params = losses.load_lpips() if uses_lpips(config) else (None, {})
    self.replicated = sharding.replicated(self.mesh)
    self.lpips_params = jax.device_put(lpips_params, self.replicated)
    self.checkpointer = checkpointing.Checkpointer(
        self.workdir / "checkpoints", config.vqgan.train.checkpoint_every,
        config.vqgan.train.keep_checkpoints, config.run.async_checkpoints)

    programs = compiled_programs(config, self.mesh, self.lpips_module)
    self.state_sharding = programs.state_sharding
    self._abstract_state = programs.abstract_state
    self._init = programs.init
    self.train_step = programs.train_step
    self._reconstruct = programs.reconstruct

  def initial_state(self) -> VQGANTrainState:
    return self._init()

  def abstract_state(self) -> VQGANTrainState:
    return self._abstract_state

  def restore_or_init(self, data_iterator: Any | None = None) -> VQGANTrainState:
    """The latest checkpoint of the workdir (moving the iterator along), else a fresh state."""
    restored = self.checkpointer.restore(self.abstract_state(), data_iterator)
    return self.initial_state() if restored is None else restored

  def step(self, state: VQGANTrainState, batch: dict[str, np.ndarray]
           ) -> tuple[VQGANTrainState, dict]:
    return self.train_step(state, sharding.shard_batch(batch, self.mesh), self.lpips_params)

  def reconstruct(self, params: PyTree, quantizer_state: PyTree, video_uint8: np.ndarray
                  ) -> np.ndarray:
    """uint8 clips -> uint8 reconstructions through the quantizer (eval mode)."""
    x_hat, _ = self._reconstruct(params, quantizer_state, jnp.asarray(video_uint8))
    return np.asarray(jax.device_get(pipeline.to_uint8(x_hat)))


def eval_params(state: VQGANTrainState, config: ml_collections.ConfigDict) -> PyTree:
  """The weights evaluation uses: the EMA copy when it is kept, else the raw parameters."""
  return getattr(state, tokenizer_lib.weights_field(config))


def write_reconstructions(trainer: VQGANTrainer, state: VQGANTrainState,
                          videos: np.ndarray, step: int) -> np.ndarray:
  """Writes ``reconstructions/step_XXXXXXX.{gif,mp4}``; returns the reconstructions."""
  stem = trainer.workdir / "reconstructions" / f"step_{step:07d}"
  reconstructions = trainer.reconstruct(eval_params(state, trainer.config),
                                        state.quantizer_state, videos)
  if jax.process_index() == 0:
    video_io.write_comparison_grid(stem, videos, reconstructions, fps=8)
  return reconstructions


def train_vqgan(config: ml_collections.ConfigDict, workdir: fileio.PathLike,
                deadline: float | None = None) -> VQGANTrainState:
  """Trains stage 1 to ``config.vqgan.train.num_steps``, resuming from the workdir if it can,
  or to the last step that fits before ``deadline`` (``--mode=train``'s time budget:
  :mod:`vqvdm_jax.training.loop`).

  The workdir records the config on its first run; a config whose model fields differ from
  the record stops here, before anything is restored or written.
  """
  workdir_lib.check_or_record_config(config, workdir, write=jax.process_index() == 0)
  trainer = VQGANTrainer(config, workdir)
  train, optim = config.vqgan.train, config.vqgan.optim
  data_iterator = pipeline.train_iterator(config.data, train.batch_size, config.seed)
  state = trainer.restore_or_init(data_iterator)
  start_step = int(jax.device_get(state.step))
  if loop.nothing_to_train("Stage 1", start_step, train.num_steps, trainer.checkpointer,
                           budgeted=deadline is not None):
    trainer.checkpointer.close()
    return state
  logging.info("Stage 1: training from step %d to %d on %d device(s).", start_step,
               train.num_steps, trainer.mesh.size)
  eval_videos = next(pipeline.eval_batches(config.data, train.num_eval_videos,
                                           train.num_eval_videos, config.seed))["video"]

  def write_eval(step: int, state: VQGANTrainState, writer, final: bool) -> None:
    if step % train.eval_every == 0 or final:
      reconstructions = write_reconstructions(trainer, state, eval_videos, step)
      middle = eval_videos.shape[1] // 2  # TensorBoard: the middle frame, originals on top
      writer.write_images(step, {"reconstructions": video_io.video_grid(
          np.concatenate([eval_videos, reconstructions])[:, middle:middle + 1],
          columns=len(eval_videos))})

  return loop.train_loop(
      stage="Stage 1", state=state, step_fn=trainer.step, data_iterator=data_iterator,
      checkpointer=trainer.checkpointer, num_steps=train.num_steps, log_every=train.log_every,
      batch_size=train.batch_size, summary_dir=trainer.workdir / "summaries",
      max_nonfinite_skips=config.run.max_nonfinite_skips,
      learning_rate_field="vqgan.optim.learning_rate", config=config,
      # Perplexity beside usage: usage counts codes that dead-code restart has just revived, so
      # it reads ~1 through a collapse that the batch's perplexity shows (RESULTS.md, issue 16).
      # A two-level tokenizer also reports its top level (codebook/top/*); one-level: absent.
      headline=("loss/l2", "loss/lpips", "loss/vq", "codebook/usage", "codebook/perplexity",
                "codebook/top/usage", "codebook/top/perplexity", "loss/discriminator"),
      learning_rates={
          "generator": learning_rate_schedule(optim.learning_rate, optim, train.num_steps),
          "discriminator": learning_rate_schedule(optim.disc_learning_rate, optim,
                                                  train.num_steps)},
      on_step=write_eval, deadline=deadline, budget_minutes=config.run.time_budget_minutes)
