"""Metric writers (clu) and progress lines: TensorBoard + console on process 0."""

from __future__ import annotations

from pathlib import Path

import jax
from clu import metric_writers, periodic_actions


def _keep_tensorflow_off_accelerators() -> None:
  """clu writes summaries through TensorFlow; it must never take GPU memory from JAX."""
  import tensorflow as tf  # clu.metric_writers has imported it already; this is free.
  tf.config.set_visible_devices([], "GPU")


def make_metric_writer(logdir: str | Path) -> metric_writers.MetricWriter:
  """clu's default writer: console, plus TensorBoard event files on process 0 only."""
  _keep_tensorflow_off_accelerators()
  return metric_writers.create_default_writer(
      str(logdir), just_logging=jax.process_index() > 0, asynchronous=False)


def make_progress_reporter(num_steps: int, writer: metric_writers.MetricWriter,
                           every_steps: int) -> periodic_actions.ReportProgress:
  """steps/s, ETA and % done, written every ``every_steps`` steps."""
  return periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                         every_steps=every_steps)
