"""Metric writers (clu) and progress lines: TensorBoard + console on process 0."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
from absl import logging
from clu import metric_writers, periodic_actions


def make_metric_writer(logdir: str | Path) -> metric_writers.MetricWriter:
  """clu's default writer: console always, TensorBoard files when TensorFlow is installed.

  Processes other than 0 only log to the console, so summaries are written once per run.
  """
  just_logging = jax.process_index() > 0
  if not just_logging and importlib.util.find_spec("tensorflow") is None:
    logging.warning("TensorFlow is not installed: metrics go to the console only. "
                    "`pip install 'vqvdm_jax[tensorboard]'` adds TensorBoard event files.")
    just_logging = True
  return metric_writers.create_default_writer(
      str(logdir), just_logging=just_logging, asynchronous=False)


def make_progress_reporter(num_steps: int, writer: metric_writers.MetricWriter,
                           every_steps: int) -> periodic_actions.ReportProgress:
  """steps/s, ETA and % done, written every ``every_steps`` steps."""
  return periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                         every_steps=every_steps)
