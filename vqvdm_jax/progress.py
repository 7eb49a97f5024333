"""One progress line for long loops that are not training (sampling, evaluation, encoding).

Training has its own lines (``training/loop.py``); these log ``done/total``, the rate and the
time left at most every ``interval_s`` seconds and once at the end, so that a sampling run of
minutes or an evaluation of hours is never silent.
"""

from __future__ import annotations

import time

from absl import logging


class Progress:
  """``update(count)`` after each batch; logs "<what>: done/total (rate unit/s, N s left)"."""

  def __init__(self, what: str, total: int, unit: str = "clips", interval_s: float = 10.0):
    self.what, self.total, self.unit, self.interval_s = what, total, unit, interval_s
    self.done = 0
    self.start = self.last = time.perf_counter()

  def update(self, count: int) -> None:
    self.done += count
    now = time.perf_counter()
    if now - self.last < self.interval_s and self.done < self.total:
      return
    self.last = now
    rate = self.done / max(now - self.start, 1e-9)
    logging.info("%s: %d/%d (%.2f %s/s, %.0f s left).", self.what, self.done, self.total, rate,
                 self.unit, (self.total - self.done) / max(rate, 1e-9))
