"""Metric writers (console + TensorBoard), progress with steps/s and ETA, NaN stops."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Mapping

import jax
import numpy as np
from clu import metric_writers, parameter_overview


class _DropLibraryInfo(logging.Filter):
  """Orbax logs every save in a dozen INFO lines; keep its warnings and errors only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def quiet_library_logs() -> None:
  """Hides library INFO chatter (absl logging routes all of it through the 'absl' logger)."""
  logging.getLogger('absl').addFilter(_DropLibraryInfo())


def make_writer(workdir: str | Path) -> metric_writers.MetricWriter:
  """Console log + TensorBoard event files in `workdir`; other processes only log."""
  return metric_writers.create_default_writer(
      str(workdir), just_logging=jax.process_index() > 0, asynchronous=True)


def log_parameter_overview(params, name: str = 'params') -> int:
  """Logs a table of the parameters; returns their count."""
  count = parameter_overview.count_parameters(params)
  if jax.process_index() == 0:
    logging.info('%s: %s parameters\n%s', name, f'{count:,}',
                 parameter_overview.get_parameter_overview(params, include_stats=False))
  return count


def check_finite(step: int, scalars: Mapping[str, float]) -> None:
  """Raises a clear FloatingPointError if a scalar is NaN or infinite."""
  bad = {k: v for k, v in scalars.items() if not math.isfinite(float(v))}
  if bad:
    raise FloatingPointError(
        f'Non-finite value(s) at step {step}: {bad}. Training stopped; the last '
        'checkpoint (saved before this point) is intact. Lower the learning rate, '
        'enable gradient clipping or check the data, then restart to resume.')


class Progress:
  """Writes the given scalars plus steps/s, items/s and ETA.

  Call `update` at log steps with the metrics averaged since the last call.
  """

  def __init__(self, total_steps: int, writer: metric_writers.MetricWriter,
               start_step: int = 0, items_per_step: int = 0, item_name: str = 'images'):
    self.total_steps = total_steps
    self.writer = writer
    self.items_per_step = items_per_step
    self.item_name = item_name
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def reset_timer(self, step: int) -> None:
    """Starts timing afresh (e.g. after compilation or evaluation)."""
    self._last_step, self._last_time = step, time.perf_counter()

  def update(self, step: int, scalars: Mapping[str, float]) -> dict[str, float]:
    now = time.perf_counter()
    steps = step - self._last_step
    out = {k: float(v) for k, v in scalars.items()}
    if steps > 0:
      rate = steps / max(now - self._last_time, 1e-9)
      out['steps_per_sec'] = rate
      if self.items_per_step:
        out[f'{self.item_name}_per_sec'] = rate * self.items_per_step
      eta = (self.total_steps - step) / rate
      out['eta_hours'] = eta / 3600
      if jax.process_index() == 0:
        logging.info('step %d/%d (%.1f%%)  %.2f steps/s  ETA %s', step, self.total_steps,
                     100.0 * step / self.total_steps, rate, format_seconds(eta))
    self.writer.write_scalars(step, out)
    self._last_step, self._last_time = step, now
    return out


def write_image_grid(writer: metric_writers.MetricWriter, step: int, name: str,
                     grid: np.ndarray) -> None:
  """One uint8 [H, W, C] grid as a TensorBoard image."""
  writer.write_images(step, {name: np.asarray(grid)[None]})


def format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}'
