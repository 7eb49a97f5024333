"""Metric writers (clu) and progress lines: TensorBoard + console on process 0."""

from __future__ import annotations

import time
from typing import Any

import jax
from clu import metric_writers, periodic_actions

from vqvdm_jax import fileio


def _keep_tensorflow_off_accelerators() -> None:
  """clu writes summaries through TensorFlow; it must never take GPU memory from JAX."""
  import tensorflow as tf  # clu.metric_writers has imported it already; this is free.
  tf.config.set_visible_devices([], "GPU")


def make_metric_writer(logdir: fileio.PathLike) -> metric_writers.MetricWriter:
  """clu's default writer: console, plus TensorBoard event files on process 0 only.

  TensorFlow writes the event files, so ``logdir`` may be a gs:// URI (passed as a string).
  """
  _keep_tensorflow_off_accelerators()
  return metric_writers.create_default_writer(
      str(logdir), just_logging=jax.process_index() > 0, asynchronous=False)


def make_progress_reporter(num_steps: int, writer: metric_writers.MetricWriter,
                           every_steps: int) -> periodic_actions.ReportProgress:
  """steps/s, ETA and % done, written every ``every_steps`` steps."""
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
