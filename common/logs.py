"""What a run tells its user: one console line per interval, TensorBoard files, NaN stops.

The TensorBoard writer uses the `tensorboard` package's event-file writer
directly, so no command imports TensorFlow (10 s of start-up and its C++ log
noise) unless it reads a TFDS data set.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import time
import types
from pathlib import Path
from typing import Any, Mapping

import flax.traverse_util
import jax
import numpy as np

from common import errors
from common import params as params_lib

# Library loggers whose INFO/WARNING lines carry nothing for the user of a command.
_QUIET_LOGGERS = {
    'jax._src.xla_bridge': logging.ERROR,  # "Unable to initialize backend 'tpu'" on every start.
    'jax._src.compiler': logging.ERROR,
    'absl.orbax': logging.ERROR,
}


# This project's packages: their INFO lines are the console; other libraries' are not.
_OUR_PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / name) + os.sep
                      for name in ('common', 'ddpm', 'latent', 'metrics', 'stylegan'))


class _DropLibraryChatter(logging.Filter):
  """Other libraries' INFO lines; Orbax's warnings too (about read-only restores)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if '/orbax/' in record.pathname:
      return record.levelno >= logging.ERROR
    return record.levelno >= logging.WARNING or record.pathname.startswith(_OUR_PACKAGES)


class _ConsoleFormatter(logging.Formatter):

  def format(self, record: logging.LogRecord) -> str:
    level = '' if record.levelno < logging.WARNING else f'{record.levelname}: '
    return f'{time.strftime("%H:%M:%S", time.localtime(record.created))} {level}{record.getMessage()}'


def quiet_library_logs() -> None:
  """Keeps the console to our own lines: third-party INFO chatter and C++ notices off.

  Call before jax/orbax do any work (the launcher does).
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')      # TensorFlow's C++ INFO (oneDNN notice).
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  for name, level in _QUIET_LOGGERS.items():
    logging.getLogger(name).setLevel(level)
  # "HH:MM:SS message" (warnings flagged) instead of absl's thread ids and file names.
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.get_absl_handler().setFormatter(_ConsoleFormatter())
  logging.getLogger('absl').addFilter(_DropLibraryChatter())
  for handler in logging.getLogger().handlers:
    handler.addFilter(_DropLibraryChatter())


# ----------------------------------------------------------------------------
# TensorBoard.


def _tensorboard_without_tensorflow() -> None:
  """Points tensorboard's file I/O at its own stub instead of importing TensorFlow.

  tensorboard resolves `tensorboard.compat.tf` to TensorFlow whenever it is installed (8-10 s
  and C++ log noise at the first event written) unless the module
  `tensorboard.compat.notf` exists, its switch for the stub. Where TensorFlow is already
  loaded (a TFDS data set), it is used as is.
  """
  if 'tensorflow' not in sys.modules:
    sys.modules.setdefault('tensorboard.compat.notf', types.ModuleType('tensorboard.compat.notf'))


class Writer:
  """TensorBoard scalars and images in `workdir` (process 0 only; others write nothing)."""

  def __init__(self, workdir: str | Path):
    self._writer = None
    if jax.process_index() == 0:
      _tensorboard_without_tensorflow()
      from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=g-import-not-at-top
      Path(workdir).mkdir(parents=True, exist_ok=True)
      self._writer = EventFileWriter(str(workdir))

  def _add(self, step: int, values: list) -> None:
    if self._writer is None or not values:
      return
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    event = event_pb2.Event(wall_time=time.time(), step=int(step),
                            summary=summary_pb2.Summary(value=values))
    self._writer.add_event(event)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                     for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """uint8 [H, W, C] images (or [1, H, W, C]) as PNGs."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    values = []
    for name, img in images.items():
      img = np.asarray(img)
      img = img[0] if img.ndim == 4 else img
      buf = io.BytesIO()
      Image.fromarray(img).save(buf, format='PNG')
      values.append(summary_pb2.Summary.Value(tag=name, image=summary_pb2.Summary.Image(
          height=img.shape[0], width=img.shape[1], colorspace=img.shape[2],
          encoded_image_string=buf.getvalue())))
    self._add(step, values)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def make_writer(workdir: str | Path) -> Writer:
  return Writer(workdir)


def read_scalars(workdir: str | Path, tag: str) -> list[tuple[int, float]]:
  """(step, value) pairs of a scalar from a workdir's event files (tests, notebooks)."""
  _tensorboard_without_tensorflow()
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  out = []
  for f in sorted(Path(workdir).glob('events.out.tfevents.*')):
    for event in event_file_loader.LegacyEventFileLoader(str(f)).Load():  # Not migrated.
      for v in event.summary.value:
        if v.tag == tag:
          out.append((event.step, float(v.simple_value)))
  return out


def write_image_grid(writer: Writer, step: int, name: str, grid: np.ndarray) -> None:
  """One uint8 [H, W, C] grid as a TensorBoard image."""
  writer.write_images(step, {name: np.asarray(grid)})


# ----------------------------------------------------------------------------
# Parameter summaries.


def count_parameters(params: Any) -> int:
  return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))


def log_parameter_overview(params: Any, name: str = 'params',
                           workdir: str | Path | None = None) -> int:
  """One line: the total and each top-level module's count; the full table to a file.

  The per-parameter table goes to WORKDIR/parameters_<name>.txt (too long for a console),
  each path spelt as `config.params` rules and `lora.targets` match it (common.params'
  `path_str`: a module name's '.' written '/', 'ff/net_0/proj/kernel').
  Returns the total count.
  """
  total = count_parameters(params)
  if jax.process_index() != 0:
    return total
  parts = []
  if isinstance(params, Mapping):
    parts = [f'{params_lib.path_str((k,))} {count_parameters(v):,}' for k, v in params.items()]
  shown = parts if len(parts) <= 12 else parts[:11] + [f'... {len(parts) - 11} more']
  where = ''
  if workdir is not None:
    from clu import parameter_overview  # pylint: disable=g-import-not-at-top
    path = Path(workdir) / f'parameters_{name.lower().replace(" ", "_")}.txt'
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {params_lib.path_str(k): v
            for k, v in flax.traverse_util.flatten_dict(params).items()}
    path.write_text(parameter_overview.get_parameter_overview(flat, include_stats=False) + '\n')
    where = f' (table: {path})'
  logging.info('%s: %s parameters%s%s', name, f'{total:,}',
               f' = {", ".join(shown)}' if shown else '', where)
  return total


# ----------------------------------------------------------------------------
# Progress and failure.


def check_finite(step: int, scalars: Mapping[str, float]) -> None:
  """Raises a clear TrainingDiverged (a FloatingPointError) if a scalar is NaN or infinite."""
  bad = {k: v for k, v in scalars.items() if not math.isfinite(float(v))}
  if bad:
    raise errors.TrainingDiverged(
        f'Non-finite value(s) at step {step}: {bad}. Training stopped; the last '
        'checkpoint (saved before this point) is intact. Lower the learning rate, '
        'enable gradient clipping or check the data, then rerun to resume.')


def format_value(v: float) -> str:
  """4 significant digits, no exponent for ordinary magnitudes."""
  if v == 0 or 1e-3 <= abs(v) < 1e5:
    return f'{v:.4g}'
  return f'{v:.3e}'


class Progress:
  """Logs one line per interval (step, rate, ETA and the metrics) and writes TensorBoard.

  Call `update` at log steps with the metrics averaged since the last call.
  """

  def __init__(self, total_steps: int, writer: Writer, start_step: int = 0,
               items_per_step: int = 0, item_name: str = 'images'):
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
    head = f'step {step}/{self.total_steps}'
    if steps > 0:
      rate = steps / max(now - self._last_time, 1e-9)
      out['steps_per_sec'] = rate
      head += f'  {rate:.2f} steps/s'
      if self.items_per_step:
        out[f'{self.item_name}_per_sec'] = rate * self.items_per_step
        head += f' ({rate * self.items_per_step:.0f} {self.item_name}/s)'
      eta = (self.total_steps - step) / rate
      out['eta_hours'] = eta / 3600
      head += f'  ETA {format_seconds(eta)}'
    if jax.process_index() == 0:
      metrics = '  '.join(f'{k} {format_value(v)}' for k, v in sorted(scalars.items()))
      logging.info('%s  |  %s', head, metrics)
    self.writer.write_scalars(step, out)
    self._last_step, self._last_time = step, now
    return out


class Timed:
  """`with Timed('compiling the train step'):` logs the start and how long it took.

  For the silent stretches of a run (reading data, compiling), so the user
  knows what the process is doing.
  """

  def __init__(self, what: str):
    self.what = what

  def __enter__(self):
    if jax.process_index() == 0:
      logging.info('%s...', self.what[0].upper() + self.what[1:])
    self._start = time.perf_counter()
    return self

  def __exit__(self, exc_type, *unused):
    self.seconds = time.perf_counter() - self._start
    if exc_type is None and jax.process_index() == 0:
      logging.info('Done %s in %.1f s.', self.what, self.seconds)
    return False


def format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}'
