"""The host-side training loop both stages share: steps, logging, checkpoints, preemption.

A stage supplies its jitted step and what to do on eval steps; this module owns the rest:
progress lines (steps/s, ETA), metric writing, periodic and final checkpoints, stopping on
SIGTERM with a checkpoint at the current step, and stopping after too many consecutive
non-finite updates (each of which the step itself has already skipped), and stopping early
under a time budget.

Time budget (``config.run.time_budget_minutes``, ``--mode=train`` on one process): the run's
budget gives each stage a deadline (:func:`stage_deadlines`). At every log step a stage compares
its measured steps/s with the time left and moves its last step forward to the last one that
fits (:func:`budgeted_last_step`); when that is before ``num_steps``, it says so, and it ends
there with its final checkpoint (and evaluation) as if ``num_steps`` had been that step. The
stop is recorded beside the stage's checkpoints, so that a later run under a budget finds the
stage trained; a run without a budget trains on from that checkpoint to ``num_steps``. A stop
after fewer steps is what a constant learning rate (the demo's) makes equal to a shorter run;
a cosine decay ends undecayed. The plan changes only at log steps, so a stage may overrun its
deadline by up to one ``log_every`` window.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vqvdm_jax import checkpointing, sharding
from vqvdm_jax.runtime import Preempted
from vqvdm_jax.training import reporting


class NonFiniteUpdates(FloatingPointError):
  """Too many consecutive steps had a non-finite loss or gradient (all of them were skipped)."""


BUDGET_STOP_FILE = "time_budget_stop.json"
# Of the budget, what loading the model and sampling after stage 2 may use: the demo's 8 videos
# (50 guided DDIM steps, with the sampler's compile) took 7 s on the idle 2-core CPU and 59 s
# with six busy processes beside it (matmul 69-84 GFLOP/s; benchmarks/RESULTS.md).
SAMPLING_SHARE = 0.08


def stage_deadlines(start: float, minutes: float, stage1_share: float) -> tuple[float, float]:
  """``--mode=train``'s deadlines under a budget of ``minutes`` from ``start`` (both
  ``time.monotonic()`` values): stage 1 ends by ``stage1_share`` of the budget, stage 2 (with
  its latent cache and compile) by ``1 - SAMPLING_SHARE`` of it, which leaves the rest for the
  samples."""
  seconds = 60.0 * minutes
  return start + stage1_share * seconds, start + (1.0 - SAMPLING_SHARE) * seconds


def budgeted_last_step(step: int, num_steps: int, steps_per_second: float,
                       seconds_left: float) -> int:
  """The last step a stage now at ``step`` reaches by its deadline, ``seconds_left`` away, at
  ``steps_per_second``: never beyond ``num_steps``, never before ``step`` (a deadline already
  past stops the stage at the current step)."""
  return min(num_steps, step + int(max(seconds_left, 0.0) * steps_per_second))


def _budget_stop_path(checkpointer: checkpointing.Checkpointer) -> epath.Path:
  return epath.Path(checkpointer.directory).parent / BUDGET_STOP_FILE


def budget_stop(checkpointer: checkpointing.Checkpointer) -> int | None:
  """The step at which an earlier run's time budget stopped this stage (None: it never did)."""
  path = _budget_stop_path(checkpointer)
  return json.loads(path.read_text())["stopped_at_step"] if path.exists() else None


def nothing_to_train(stage: str, start_step: int, num_steps: int,
                     checkpointer: checkpointing.Checkpointer, budgeted: bool) -> bool:
  """True, after saying why, when a stage restored at ``start_step`` has nothing to train: it
  reached ``num_steps``, or (``budgeted``: this run has a time budget) an earlier run's budget
  stopped it at this very checkpoint."""
  if start_step >= num_steps:
    logging.info("%s already trained to step %d (num_steps=%d); nothing to do.", stage,
                 start_step, num_steps)
    return True
  if budgeted and budget_stop(checkpointer) == start_step:
    logging.info("%s stopped at step %d of %d under an earlier run's time budget; nothing to do "
                 "(--config.run.time_budget_minutes=0 trains on to step %d).", stage,
                 start_step, num_steps, num_steps)
    return True
  return False


def unread_fields(config: Any, stage: str, *more: str) -> tuple[str, ...]:
  """Config fields no program of the ``stage`` trainer reads: the host loop's own (how often it
  logs and saves under ``{stage}.train``, evaluation, the run's policies), ``more``, and
  ``{stage}.train.num_steps`` when the learning rate does not decay (only a decay schedule
  reads the run's length, so a longer run is the same program).
  :func:`vqvdm_jax.config.per_config` leaves them out of the key of the stage's programs
  (tests/test_config.py proves each stage's programs unchanged when they change)."""
  loop_cadence = tuple(f"{stage}.train.{name}"
                       for name in ("log_every", "checkpoint_every", "keep_checkpoints"))
  run_length = ((f"{stage}.train.num_steps",) if config[stage].optim.lr_decay == "constant"
                else ())
  return (*loop_cadence, *more, "evaluation", "run", *run_length)


class CompiledRun(NamedTuple):
  """What a trainer compiles for a config and a mesh (shared by every trainer of the config in a
  process: :func:`vqvdm_jax.config.per_config`)."""

  state_sharding: Any  # the train state's shardings on the mesh
  abstract_state: Any  # the train state's shapes, dtypes and shardings (what restores target)
  init: Callable[..., Any]  # jitted: a fresh train state
  train_step: Callable[..., Any]  # jitted: (state, batch, ...) -> (state, metrics)
  reconstruct: Callable[..., Any] | None = None  # jitted (stage 1): eval-mode reconstructions


def compile_run(config: Any, mesh: jax.sharding.Mesh, abstract_state: Any,
                init: Callable[..., Any], train_step: Callable[..., Any],
                replicated_step_args: int = 0,
                reconstruct: Callable[..., Any] | None = None) -> CompiledRun:
  """A trainer's programs on ``mesh``: the state's shardings (``config.mesh``'s parameter
  sharding), ``init`` jitted to them, and ``train_step(state, batch, *replicated) -> (state,
  metrics)`` jitted with the state donated, the batch split over the data axis and
  ``replicated_step_args`` more arguments replicated."""
  state_sharding = sharding.state_shardings(abstract_state, mesh, config.mesh.param_sharding,
                                            config.mesh.fsdp_min_size)
  replicated = sharding.replicated(mesh)
  return CompiledRun(
      state_sharding=state_sharding,
      abstract_state=sharding.abstract_with_shardings(abstract_state, state_sharding),
      init=jax.jit(init, out_shardings=state_sharding),
      train_step=jax.jit(train_step, in_shardings=(
          state_sharding, sharding.batch_sharding(mesh), *[replicated] * replicated_step_args),
                         out_shardings=(state_sharding, replicated), donate_argnums=(0,)),
      reconstruct=reconstruct)


class PreemptionGuard:
  """Turns SIGTERM (what a preempted TPU VM or a SLURM time limit sends) and Ctrl-C (SIGINT)
  into a stop request: the loop saves a checkpoint after the current step and stops. A second
  Ctrl-C stops at once (KeyboardInterrupt), without that save.

  On one process the guard installs its own handlers. On several, JAX's distributed runtime
  already listens for SIGTERM and ``reached_preemption_sync_point`` makes every process stop
  at the same step, so that the collective checkpoint save can happen.
  """

  def __init__(self):
    self._requested = threading.Event()
    self._previous = {}
    # Several processes must stop at the same step: there only the runtime's sync point decides.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self._requested.is_set():
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt  # the second Ctrl-C: stop now
    name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
    logging.warning("%s received: saving a checkpoint after the current step, then stopping%s.",
                    name, "; press Ctrl-C again to stop at once" if signum == signal.SIGINT
                    else "")
    self._requested.set()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested.is_set()

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def keep_if(condition: jax.Array, new: Any, old: Any) -> Any:
  """Inside a step: ``new`` if the scalar ``condition`` holds, else ``old`` (whole pytrees).

  One conditional, not a select per leaf: a train state has hundreds of leaves (weights, EMA,
  Adam's moments), and a select and a broadcast each made the tiny stage-1 step's compile ~12 %
  slower (default optimisation level: the tiny stage-2 step 28 s against 24 s), for the same
  values and step time.
  """
  return jax.lax.cond(condition, lambda: new, lambda: old)


def skip_nonfinite_update(finite: jax.Array, new_state: Any, old_state: Any) -> Any:
  """Inside a step: keep ``old_state``'s values (but the new step count) if ``finite`` is False.

  ``new_state`` and ``old_state`` carry a ``nonfinite_streak`` counter, reset by a good step.
  """
  kept = keep_if(finite, new_state, old_state)
  streak = jnp.where(finite, 0, old_state.nonfinite_streak + 1).astype(jnp.int32)
  return kept.replace(step=new_state.step, nonfinite_streak=streak)


def all_finite(*values: jax.Array) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(value)) for value in values]))


def apply_gradients(state: Any, grads: Any, tx: optax.GradientTransformation,
                    ema_decay: float) -> Any:
  """Inside a step: one optimizer update of ``state.params`` and the EMA of the weights,
  ``ema <- d * ema + (1 - d) * params`` (``ema_decay`` 0: the EMA is the weights)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = (optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
                if ema_decay > 0 else params)
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                       opt_state=opt_state)


def finish_step(new_state: Any, old_state: Any, metrics: dict, loss: jax.Array,
                grad_norm: jax.Array) -> tuple[Any, dict]:
  """Inside a step: ``new_state``, or ``old_state``'s values when the loss or the gradient is
  not finite (recorded in ``metrics['nonfinite/skipped']``)."""
  finite = all_finite(loss, grad_norm)
  metrics["nonfinite/skipped"] = 1.0 - finite.astype(jnp.float32)
  return skip_nonfinite_update(finite, new_state, old_state), metrics


def train_loop(*, stage: str, state: Any, step_fn: Callable[[Any, dict], tuple[Any, dict]],
               data_iterator: Any, checkpointer: checkpointing.Checkpointer, num_steps: int,
               log_every: int, batch_size: int, summary_dir: Any, max_nonfinite_skips: int,
               learning_rate_field: str,
               on_step: Callable[[int, Any, Any, bool], None] | None = None,
               config: Any | None = None, headline: tuple[str, ...] = (),
               learning_rates: dict[str, Callable[[int], Any]] | None = None,
               deadline: float | None = None, budget_minutes: float = 0.0) -> Any:
  """Runs ``state`` from its step to ``num_steps`` (or, with a ``deadline``, to the last step
  that fits before it: the module's "Time budget"); returns the final state.

  ``on_step(step, state, writer, final)`` runs after every step (evaluation, samples; ``final``
  on the last); ``config`` goes to the summaries as hparams; ``headline`` names the metrics of
  the progress line; ``learning_rates`` maps names to the schedules whose values the summaries
  record. ``deadline`` is a ``time.monotonic()`` value; ``budget_minutes`` (the whole run's
  budget) only goes into what the stop records and says.

  Raises :class:`Preempted` after saving on SIGTERM, :class:`NonFiniteUpdates` when
  ``max_nonfinite_skips`` consecutive updates were skipped.
  """
  start_step = int(jax.device_get(state.step))
  writer = reporting.make_metric_writer(summary_dir)
  if config is not None:
    reporting.write_config(writer, config)
  progress = reporting.make_progress_reporter(num_steps, writer, log_every)
  guard = PreemptionGuard()
  window_start = time.time()
  last_step = num_steps
  try:
    for step in range(start_step + 1, num_steps + 1):
      if step == start_step + 1:
        logging.info("%s: compiling the train step ...", stage)
        compile_start = time.time()
      state, metrics = step_fn(state, next(data_iterator))
      if step == start_step + 1:
        jax.block_until_ready(metrics)
        logging.info("%s: compiled and ran the first step in %.1f s.", stage,
                     time.time() - compile_start)
        window_start, window_step = time.time(), step
      if step % log_every == 0 or step == num_steps:
        metrics["nonfinite/streak"] = state.nonfinite_streak
        for name, schedule in (learning_rates or {}).items():
          metrics[f"learning_rate/{name}"] = schedule(step - 1)  # what this step's update used
        window_steps = step - window_step
        metrics, window_start = reporting.write_train_metrics(
            writer, step, metrics, window_steps * batch_size, window_start)
        if window_steps:
          steps_per_second = metrics["clips_per_second"] / batch_size
          if deadline is not None:
            planned = budgeted_last_step(step, num_steps, steps_per_second,
                                         deadline - time.monotonic())
            if planned < num_steps and last_step == num_steps:
              logging.warning(
                  "%s: at %.2f steps/s, %d steps do not fit the time budget "
                  "(run.time_budget_minutes=%g); stopping at step %d instead. "
                  "--config.run.time_budget_minutes=0 trains all of them (and resumes a "
                  "stopped run).", stage, steps_per_second, num_steps, budget_minutes,
                  planned)
            last_step = planned
          logging.info("%s", reporting.progress_line(
              stage, step, last_step, steps_per_second, metrics, headline))
        window_step = step
        if metrics["nonfinite/streak"] >= max_nonfinite_skips:
          raise NonFiniteUpdates(
              f"{stage}: the last {int(metrics['nonfinite/streak'])} updates up to step {step} "
              f"had a non-finite loss or gradient and were skipped; the last good checkpoint is "
              f"step {checkpointer.latest_step()} in {checkpointer.directory}. Lower "
              f"config.{learning_rate_field} and restart from it.")
      progress(step)  # after the log step's device_get, so its steps/s times real compute
      if guard.should_stop(step):
        checkpointer.save(step, state, data_iterator, force=True)
        raise Preempted(step, str(checkpointer.directory))
      final = step >= last_step
      checkpointer.save(step, state, data_iterator, force=final)
      if on_step is not None:
        on_step(step, state, writer, final)
      if final:
        break
    if last_step < num_steps and jax.process_index() == 0:
      _budget_stop_path(checkpointer).write_text(json.dumps(
          {"stopped_at_step": last_step, "num_steps": num_steps,
           "time_budget_minutes": budget_minutes}))
      logging.info("%s: stopped at step %d of %d to keep within the time budget.", stage,
                   last_step, num_steps)
  finally:
    guard.close()
    writer.flush()
    checkpointer.close()  # also on errors: a save in flight completes, nothing is lost
  return state
