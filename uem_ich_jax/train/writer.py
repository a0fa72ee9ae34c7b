"""TensorBoard event files (tensorboardX) and console lines, plus steps/s and ETA.

clu's own writers and progress hooks import TensorFlow, which this project does
not depend on. This module replaces the small part of them the trainer needs.
Only process 0 writes, so a multi-host run gives one set of event files.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import jax
import numpy as np

logger = logging.getLogger(__name__)


class MetricWriter:
  """Write scalar metrics to `workdir/tensorboard` and to the log."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None):
    self._enabled = jax.process_index() == 0 if enabled is None else enabled
    self._writer = None
    if self._enabled:
      # Imported here so that a process that never writes does not need it.
      from tensorboardX import SummaryWriter

      self._writer = SummaryWriter(logdir=os.path.join(os.fspath(workdir), "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, float], *, prefix: str = "") -> None:
    if not self._enabled:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(f"{prefix}{name}", float(value), global_step=step)
    line = ", ".join(f"{prefix}{name}={_format(value)}" for name, value in scalars.items())
    logger.info("step %d: %s", step, line)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _format(value: float) -> str:
  value = float(value)
  if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
    return f"{value:.3e}"
  return f"{value:.4f}"


class Progress:
  """Steps per second and time left, measured between calls of `update`.

  The first interval after a (re)start includes compilation, so the first
  reported rate is low. Later reports measure steady training.
  """

  def __init__(self, total_steps: int, start_step: int):
    self._total = total_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def restart(self, step: int) -> None:
    """Start a new interval at `step`, leaving out the time since the last update."""
    self._last_step, self._last_time = step, time.perf_counter()

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    elapsed = max(now - self._last_time, 1e-9)
    rate = (step - self._last_step) / elapsed
    self._last_step, self._last_time = step, now
    eta = (self._total - step) / rate if rate > 0 else float("nan")
    return {"steps_per_second": rate, "eta_seconds": eta}


def format_eta(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "unknown"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}"
