"""Stage 2 with a token prior: the autoregressive (Taming / TATS) or masked (MaskGIT) transformer
over the tokenizer's cached code indices, selected by ``config.stage2``.

Autoregressive: next-code cross-entropy (Taming eq. 8). Masked: cross-entropy on the codes a
cosine-scheduled random mask hides (MaskGIT eqs. 1-2). Either way the class becomes the null class
at rate ρ = ``transformer.class_drop_rate`` so that guidance on logits works at sampling time.
The step, mesh, checkpoints, resumption and the loop are the diffusion stage's
(:mod:`vqvdm_jax.training.loop`). Workdir layout: ``DIR/<stage2>/checkpoints``,
``DIR/<stage2>/summaries``, and the code cache ``DIR/tokens``.
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

from vqvdm_jax import checkpointing, fileio, sharding
from vqvdm_jax import config as config_lib
from vqvdm_jax import workdir as workdir_lib
from vqvdm_jax.data import tokens as tokens_lib
from vqvdm_jax.diffusion.model import null_label
from vqvdm_jax.inference.tokenizer import load_tokenizer
from vqvdm_jax.models.transformer import TokenTransformer
from vqvdm_jax.priors import autoregressive, masked
from vqvdm_jax.priors import model as prior_model
from vqvdm_jax.training import loop
from vqvdm_jax.training.diffusion_trainer import drop_labels
from vqvdm_jax.training.optimizers import learning_rate_schedule, make_optimizer

PyTree = Any


@flax.struct.dataclass
class TokenTrainState:
  step: jax.Array
  params: PyTree
  ema_params: PyTree  # sampling uses these
  opt_state: PyTree
  rng: jax.Array  # base key; step keys are fold_in(rng, step)
  tokenizer_step: jax.Array  # the stage-1 checkpoint whose codes this model learned
  nonfinite_streak: jax.Array  # consecutive skipped (non-finite) updates up to this step


def make_train_step(config: ml_collections.ConfigDict, model: TokenTransformer,
                    tx: optax.GradientTransformation):
  """The pure step ``(state, batch) -> (state, metrics)``; batch = {codes [B, t, h, w] (two
  levels: the sequence [B, L_top + L_bottom], data/tokens.py), label, fps}."""
  ema_decay = config.transformer.optim.ema_decay
  is_masked = not model.causal

  def train_step(state: TokenTrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    label_rng, mask_rng, dropout_rng = jax.random.split(rng, 3)
    codes = batch["codes"].reshape(batch["codes"].shape[0], -1)  # raster (t, h, w) order
    labels = drop_labels(prior_model.conditioning_labels(config, batch["label"]),
                         config.transformer.class_drop_rate, null_label(config), label_rng)
    if is_masked:
      if model.num_levels == 2:
        mask, loss_mask = masked.two_level_token_mask(mask_rng, codes.shape[0],
                                                      model.level_lengths)
      else:
        mask = loss_mask = masked.random_token_mask(mask_rng, *codes.shape)
      inputs = jnp.where(mask, model.mask_tokens, codes)  # each level's [MASK]
    else:
      mask, inputs = None, codes

    def loss_fn(params):
      logits = model.apply({"params": params}, inputs, labels, batch["fps"], train=True,
                           rngs={"dropout": dropout_rng})
      if is_masked:
        return masked.masked_token_loss(logits, codes, loss_mask, model.level_factors)
      return autoregressive.next_token_loss(logits, codes, model.level_factors)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    metrics = {"loss/tokens": loss, "grad_norm/transformer": optax.tree.norm(grads),
               "conditioning/null_label_rate": jnp.mean(labels == null_label(config))}
    if is_masked:
      metrics["mask/ratio"] = jnp.mean(mask)
    new_state = loop.apply_gradients(state, grads, tx, ema_decay)
    return loop.finish_step(new_state, state, metrics, loss, metrics["grad_norm/transformer"])

  return train_step


def make_prior_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  train, optim = config.transformer.train, config.transformer.optim
  return make_optimizer(optim.learning_rate, optim, train.num_steps)


def init_state(config: ml_collections.ConfigDict, model: TokenTransformer,
               tx: optax.GradientTransformation, tokenizer_step: int) -> TokenTrainState:
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed + 2))
  params = prior_model.init_transformer_params(model, init_rng)
  return TokenTrainState(
      step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
      opt_state=tx.init(params), rng=state_rng,
      tokenizer_step=jnp.asarray(tokenizer_step, jnp.int32),
      nonfinite_streak=jnp.zeros((), jnp.int32))


def program_ignores(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """What no token-prior program reads: the loop's (:func:`loop.unread_fields`), sampling, the
  tokenizer's training (its model and quantizer set the code grid and vocabulary, so they
  count) and the latent diffusion model (its conditioning fields, use_class, use_fps and
  class_drop_rate, are the priors' too)."""
  return loop.unread_fields(
      config, "transformer", "transformer.sample", "vqgan.train", "vqgan.eval", "vqgan.loss",
      "vqgan.optim", "vqgan.discriminator", *(f"diffusion.{name}" for name in (
          "unet", "schedule", "sample", "latents", "optim", "train", "prediction",
          "loss_weighting", "min_snr_gamma")))


@config_lib.per_config(ignoring=program_ignores)
def abstract_state(config: ml_collections.ConfigDict) -> TokenTrainState:
  """The shapes of a fresh token-prior state, traced once per config."""
  return jax.eval_shape(functools.partial(init_state, config, prior_model.make_transformer(config),
                                          make_prior_optimizer(config), 0))


@config_lib.per_config(copies=False, ignoring=program_ignores)
def compiled_programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                      ) -> loop.CompiledRun:
  """The jitted init and train step of a token-prior run on ``mesh``, built once per process
  for each config (every trainer of the config shares them)."""
  model, tx = prior_model.make_transformer(config), make_prior_optimizer(config)
  # The tokenizer step is an argument, not a constant: one compiled init serves every step.
  return loop.compile_run(config, mesh, abstract_state(config),
                          functools.partial(init_state, config, model, tx),
                          make_train_step(config, model, tx))


class TokenTrainer:
  """Transformer, optimizer, mesh, jitted step and checkpointer of a token-prior run."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: fileio.PathLike,
               devices: list | None = None):
    config_lib.validate(config)
    self.config = config
    self.workdir = workdir_lib.stage2_dir(workdir, config.stage2)
    self.mesh = sharding.make_mesh(config.mesh, devices)
    train = config.transformer.train
    sharding.check_batch_size(train.batch_size, self.mesh, "transformer.train.batch_size")
    self.model = prior_model.make_transformer(config)
    self.checkpointer = checkpointing.Checkpointer(
        self.workdir / "checkpoints", train.checkpoint_every, train.keep_checkpoints,
        config.run.async_checkpoints)
    programs = compiled_programs(config, self.mesh)
    self.state_sharding = programs.state_sharding
    self._abstract_state = programs.abstract_state
    self._init = programs.init
    self.train_step = programs.train_step

  def initial_state(self, tokenizer_step: int) -> TokenTrainState:
    return self._init(tokenizer_step)

  def restore(self, data_iterator: Any | None = None) -> TokenTrainState | None:
    return self.checkpointer.restore(self._abstract_state, data_iterator)

  def step(self, state: TokenTrainState, batch: dict[str, np.ndarray]):
    return self.train_step(state, sharding.shard_batch(batch, self.mesh))


def train_prior(config: ml_collections.ConfigDict, workdir: fileio.PathLike,
                deadline: float | None = None) -> TokenTrainState:
  """Trains ``config.stage2``'s transformer to ``transformer.train.num_steps`` (or to the last
  step that fits before ``deadline``: :mod:`vqvdm_jax.training.loop`) on the latest
  tokenizer's codes, resuming what ``DIR/<stage2>`` holds."""
  workdir_lib.check_or_record_config(config, workdir, write=jax.process_index() == 0)
  tokenizer = load_tokenizer(workdir, config=config)
  cache = tokens_lib.build_or_load(config, workdir, tokenizer.step, tokenizer.encode_to_indices)
  trainer = TokenTrainer(config, workdir)
  train, optim = config.transformer.train, config.transformer.optim
  data_iterator = tokens_lib.train_iterator(cache, train.batch_size, config.seed)
  state = trainer.restore(data_iterator)
  if state is None:
    state = trainer.initial_state(tokenizer.step)
  elif int(state.tokenizer_step) != tokenizer.step:
    logging.warning("The %s prior resumes a model trained on tokenizer step %d codes; the latest "
                    "tokenizer is step %d.", config.stage2, int(state.tokenizer_step),
                    tokenizer.step)
  start_step = int(jax.device_get(state.step))
  if loop.nothing_to_train(f"Stage 2 ({config.stage2})", start_step, train.num_steps,
                           trainer.checkpointer, budgeted=deadline is not None):
    trainer.checkpointer.close()
    return state
  logging.info("Stage 2 (%s): training from step %d to %d on %d device(s); codes %s, "
               "vocabulary %d.", config.stage2, start_step, train.num_steps, trainer.mesh.size,
               cache.latent_shape, trainer.model.vocab_size)
  return loop.train_loop(
      stage=f"Stage 2 ({config.stage2})", state=state, step_fn=trainer.step,
      data_iterator=data_iterator, checkpointer=trainer.checkpointer,
      num_steps=train.num_steps, log_every=train.log_every, batch_size=train.batch_size,
      summary_dir=trainer.workdir / "summaries",
      max_nonfinite_skips=config.run.max_nonfinite_skips,
      learning_rate_field="transformer.optim.learning_rate", config=config,
      headline=("loss/tokens", "grad_norm/transformer"),
      learning_rates={"transformer": learning_rate_schedule(optim.learning_rate, optim,
                                                            train.num_steps)},
      deadline=deadline, budget_minutes=config.run.time_budget_minutes)
