"""Metric writers (clu) and progress lines: TensorBoard + console on process 0.

clu is imported when a writer is made, not with this module: its writers import TensorFlow
(~4 s), which a command that stops on a bad argument, or that only samples, never needs.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import jax

from vqvdm_jax import fileio

if TYPE_CHECKING:
  from clu import metric_writers, periodic_actions


def _keep_tensorflow_off_accelerators() -> None:
  """clu writes summaries through TensorFlow; it must never take GPU memory from JAX."""
  import tensorflow as tf  # clu.metric_writers has imported it already: free here.
  tf.config.set_visible_devices([], "GPU")


def make_metric_writer(logdir: fileio.PathLike) -> metric_writers.MetricWriter:
  """clu's default writer: console, plus TensorBoard event files on process 0 only.

  TensorFlow writes the event files, so ``logdir`` may be a gs:// URI (passed as a string).
  """
  from clu import metric_writers  # imports TensorFlow (module docstring)
  _keep_tensorflow_off_accelerators()
  return metric_writers.create_default_writer(
      str(logdir), just_logging=jax.process_index() > 0, asynchronous=False)


def make_progress_reporter(num_steps: int, writer: metric_writers.MetricWriter,
                           every_steps: int) -> periodic_actions.ReportProgress:
  """steps/s, ETA and % done, written every ``every_steps`` steps."""
  from clu import periodic_actions  # imports TensorFlow (module docstring)
  return periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                         every_steps=every_steps)


def write_train_metrics(writer: metric_writers.MetricWriter, step: int, metrics: Any,
                        clips: int, window_start: float) -> tuple[dict[str, float], float]:
  """Fetches a step's metrics (waiting for it), adds clips/s since ``window_start``, writes them.

  Returns the metrics as floats and the time the next window starts.
  """
  values = {name: float(value) for name, value in jax.device_get(metrics).items()}
  now = time.time()
  values["clips_per_second"] = clips / max(now - window_start, 1e-9)
  writer.write_scalars(step, values)
  return values, now


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(stage: str, step: int, num_steps: int, steps_per_second: float,
                  values: dict[str, float], headline: tuple[str, ...]) -> str:
  """``Stage 1 step 40/600 (7%) 1.72 steps/s ETA 5m25s | l2 0.0512 lpips 0.2310``: the few
  numbers a person follows; every metric still goes to the summaries."""
  eta = (num_steps - step) / steps_per_second if steps_per_second > 0 else float("nan")
  losses = "  ".join(f"{name.removeprefix('loss/').replace('/', ' ')} {values[name]:.4g}"
                     for name in headline if name in values)
  return (f"{stage} step {step}/{num_steps} ({100 * step // num_steps}%) "
          f"{steps_per_second:.2f} steps/s, ETA {format_duration(eta) if eta == eta else '?'}"
          f" | {losses}")


def write_config(writer: metric_writers.MetricWriter, config: Any) -> None:
  """The run's config as TensorBoard hparams: every field by its dotted name."""
  from vqvdm_jax import workdir as workdir_lib
  writer.write_hparams({name: value if isinstance(value, (bool, int, float, str)) else str(value)
                        for name, value in workdir_lib.flatten(config).items()})
