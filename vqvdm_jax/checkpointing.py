"""Every Orbax call of the project: save and restore a train state with its input iterator.

The trainers see ``Checkpointer.save(step, state, data_iterator)`` and
``Checkpointer.restore(abstract_state, data_iterator)``; loading a trained model for inference
sees :func:`restore_fields`, which reads some fields of a saved state (weights, not optimizer
moments) without knowing the rest. Saves are atomic (Orbax writes to a
temporary directory and renames), so an interrupted save never corrupts an earlier checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging as std_logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from vqvdm_jax import config as config_lib
from vqvdm_jax import fileio


class UnrestorableCheckpointError(config_lib.UserError):
  """Every checkpoint of a directory failed to restore; the message lists why, step by step."""


def _short_reason(error: BaseException) -> str:
  """The root cause of an Orbax/TensorStore error, in one line: it names the file and the problem.

  Orbax wraps a failed array read in an ``Exception`` whose text ends in a TensorStore spec
  (``...})>.``); the error it was raised from says what went wrong (``OUT_OF_RANGE: Error
  reading "params.../0.0.0" ...: Requested byte range [0, 6424) is not valid for value of size
  7``).
  """
  while error.__cause__ is not None or (error.__context__ is not None
                                        and not error.__suppress_context__):
    error = error.__cause__ or error.__context__
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  reason = lines[0] if lines else type(error).__name__
  return f"{type(error).__name__}: {reason[:300]}"


# Orbax reads a checkpoint's arrays concurrently on an event loop it closes as soon as one read
# fails. The reads still in flight then end on TensorStore's threads by scheduling onto the
# closed loop ("RuntimeError: Event loop is closed"), and their coroutines and the future that
# gathered them are collected later, each reporting the read error again: ~1,200 tracebacks
# (38,000 lines) on stderr for one truncated checkpoint of the tiny config, after the one
# warning that says what happened.
_FAILED_READ_COROUTINE = "_read_array_index_and_device_put"
# No straggler for this long: the failed reads have ended. 0.5 s let a fresh-clone CI run see
# stragglers arrive after it, while the other test worker loaded both cores (2026-12-03).
_QUIET_AFTER_FAILED_READS_S = 2.0
_MAX_WAIT_FOR_FAILED_READS_S = 15.0


def _is_failed_read_straggler(unraisable: Any) -> bool:
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return True
  code = getattr(unraisable.object, "cr_code", None)
  return getattr(code, "co_name", None) == _FAILED_READ_COROUTINE


class _UnretrievedFutureFilter(std_logging.Filter):
  """Drops asyncio's "... exception was never retrieved" record of the closed loop's futures."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return "exception was never retrieved" not in str(record.msg)


@contextlib.contextmanager
def _failed_reads_kept_quiet() -> Iterator[list[str]]:
  """Keeps the stragglers of failed Orbax reads off stderr while restoring; every other
  unraisable exception still reaches the previous hook.

  Yields a list to which the caller appends the reason of each failed restore (a string: the
  error itself would keep the failed reads' frames, and so their coroutines, alive). If there
  are any, the exit waits for the failed reads to end (stragglers stop for
  ``_QUIET_AFTER_FAILED_READS_S``) and collects their coroutines before the previous hook is put
  back.
  """
  previous = sys.unraisablehook
  last_straggler = [time.monotonic()]

  def hook(unraisable):
    if _is_failed_read_straggler(unraisable):
      last_straggler[0] = time.monotonic()
    else:
      previous(unraisable)

  sys.unraisablehook = hook
  asyncio_logger, unretrieved = std_logging.getLogger("asyncio"), _UnretrievedFutureFilter()
  asyncio_logger.addFilter(unretrieved)
  failures: list[str] = []
  try:
    yield failures
  finally:
    if failures:
      last_straggler[0] = time.monotonic()  # a quiet spell from now: reads may be in flight
      deadline = time.monotonic() + _MAX_WAIT_FOR_FAILED_READS_S
      while time.monotonic() < deadline:
        gc.collect()  # the failed reads' coroutines sit in reference cycles
        if time.monotonic() - last_straggler[0] >= _QUIET_AFTER_FAILED_READS_S:
          break
        time.sleep(0.05)
    asyncio_logger.removeFilter(unretrieved)
    sys.unraisablehook = previous


def _unreadable_reason(step_directory: Any, error: BaseException) -> str:
  """Why one step's checkpoint failed to restore, in one line that names what is wrong."""
  metadata = step_directory / "state" / "_METADATA"
  if (step_directory / "state").exists() and not metadata.exists():
    # Orbax's own error is a "pytree structure error" that does not say the file is missing.
    return f"{metadata} is missing: the checkpoint is incomplete (an interrupted copy?)"
  return _short_reason(error)


def _restore_newest_readable(directory: Any, steps: Iterable[int],
                             restore_step: Callable[[int], Any],
                             set_aside: Callable[[int], Any] | None = None,
                             advice: str = "") -> tuple[Any, int] | None:
  """``(restore_step(step), step)`` for the newest of ``steps`` that can be read; None if there
  are no steps.

  A step that fails (a truncated file, a missing ``_METADATA``: a disk filled up, a copy
  interrupted) is reported in one warning, handed to ``set_aside`` if given (which returns where
  it now is), and the previous step is tried. :class:`UnrestorableCheckpointError`, listing each
  step's reason and then ``advice``, when none can be read.
  """
  with _failed_reads_kept_quiet() as failures:
    for candidate in sorted(steps, reverse=True):
      try:
        return restore_step(candidate), candidate
      except Exception as error:  # noqa: BLE001 -- any failure to read: try an older one
        reason = _unreadable_reason(directory / str(candidate), error)
        failures.append(f"step {candidate}: {reason}")
        moved = f"; moved to {set_aside(candidate)}" if set_aside is not None else ""
        logging.warning("The checkpoint of step %d in %s cannot be restored (%s)%s, trying the "
                        "previous one.", candidate, directory, reason, moved)
  if failures:
    raise UnrestorableCheckpointError(
        f"No checkpoint in {directory} can be restored ({'; '.join(failures)}). {advice}".strip())
  return None


@functools.cache
def _save_whole_replicas_on_cpu() -> None:
  """On the CPU backend, Orbax writes each replicated array from one replica, whole.

  Orbax's default (replica-parallel saving) splits every replicated array into one slice a
  device and transfers the slices separately: worth it across accelerators and hosts, pure cost
  on CPU devices sharing one host memory, where each slice is a separately compiled and
  dispatched ``lax.slice`` (the tiny config's stage-1 state on 8 CPU devices: 15 s for a
  process's first save and 3.5 s for each next one, against 1.7 s and 1.0 s whole;
  benchmarks/RESULTS.md, "Test suite"). The files written are the same.
  """
  if jax.default_backend() == "cpu":
    # Orbax warns that it overrides its handler: a line on every run that no user can act on.
    absl_logger = std_logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(std_logging.ERROR)
    try:
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    finally:
      absl_logger.setLevel(level)


class Checkpointer:
  """A directory of step-numbered checkpoints: state (pytree) + optional grain iterator state."""

  def __init__(self, directory: fileio.PathLike, save_every: int, keep: int,
               async_save: bool = True):
    self.directory = fileio.absolute(directory)  # an epath.Path: local, or gs:// for Orbax
    self.save_every = save_every
    self._closed = False
    _save_whole_replicas_on_cpu()
    # The interval is applied here, not by Orbax, which would also save the first step it sees.
    # Asynchronous saves copy the state to host memory and write it while training goes on.
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any | None = None,
           force: bool = False) -> bool:
    """Saves if ``step`` is on the save interval (or ``force``); returns whether it saved."""
    if not force and step % self.save_every:
      return False
    if step == self.latest_step():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info("Saving checkpoint at step %d to %s.", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, data_iterator: Any | None = None,
              step: int | None = None) -> Any | None:
    """The state of ``step`` (default: the latest) laid out like ``abstract_state``, or None.

    ``abstract_state`` is a pytree of arrays or ``jax.ShapeDtypeStruct``s with shardings; the
    restored arrays take those shardings. The iterator, if given, is moved to its saved position.

    Without ``step``, a newest checkpoint that cannot be read (a truncated file, a missing
    ``_METADATA``: a disk filled up, a copy interrupted) is reported in one warning, moved aside
    to ``<step>.unrestorable`` (kept, never deleted, and out of the way of new saves) and the
    previous one is restored; :class:`UnrestorableCheckpointError` when none can be.
    """
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    if step is not None:
      return self._restore_step(step, items)
    restored = _restore_newest_readable(
        self.directory, self._manager.all_steps(), lambda each: self._restore_step(each, items),
        set_aside=self._move_aside,
        advice="They are kept as <step>.unrestorable; start in a new --workdir or repair them.")
    return None if restored is None else restored[0]

  def _restore_step(self, step: int, items: dict) -> Any:
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored checkpoint of step %d from %s.", step, self.directory)
    return restored["state"]

  def _move_aside(self, step: int) -> Any:
    source = self.directory / str(step)
    target = self.directory / f"{step}.unrestorable"
    if jax.process_index() == 0 and source.exists():
      source.rename(target)
    self._manager.reload()
    return target

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for a save in flight, then releases the manager; a second call does nothing."""
    if self._closed:
      return
    self._manager.wait_until_finished()
    self._manager.close()
    self._closed = True


def checkpoint_steps(directory: fileio.PathLike) -> list[int]:
  """The steps of the finished checkpoints in ``directory`` (none if it does not exist)."""
  directory = fileio.absolute(directory)
  if not directory.exists():
    return []
  return list(ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False)).all_steps())


def restore_fields(directory: fileio.PathLike, abstract_fields: dict[str, Any],
                   step: int | None = None) -> tuple[dict[str, Any], int] | None:
  """Some top-level fields of a saved train state, and the step; None without a checkpoint.

  ``abstract_fields`` maps field names (``params``, ``ema_params``, ...) to pytrees of
  ``jax.ShapeDtypeStruct``s with shardings; the arrays are read straight into those shardings.
  The other fields (optimizer states, discriminator) are neither read nor built.
  """
  directory = fileio.absolute(directory)
  steps = checkpoint_steps(directory)
  if not steps:
    return None
  if step is not None and step not in steps:
    raise config_lib.MissingCheckpointError(
        f"{directory} has no checkpoint of step {step}; it has steps {sorted(steps)}.")
  abstract_fields = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_fields)
  args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract_fields, restore_args=ocp.checkpoint_utils.construct_restore_args(
          abstract_fields), partial_restore=True))
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  try:
    if step is not None:
      return dict(manager.restore(step, args=args)["state"]), step
    return _restore_newest_readable(  # read-only: an unreadable step stays where it is
        directory, steps, lambda each: dict(manager.restore(each, args=args)["state"]))
  finally:
    manager.close()
