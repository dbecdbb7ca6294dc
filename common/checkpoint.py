"""Orbax checkpoints with auto-resume, and clean stops on preemption.

A run's workdir holds ``checkpoints/<step>/``. Saves are asynchronous (the
train loop goes on while the arrays are written); a save killed half-way
leaves a ``<step>.orbax-checkpoint-tmp*`` folder that is never restored and is
deleted at the next start. ``PreemptionGuard`` turns SIGTERM (what SLURM,
Kubernetes and TPU maintenance send) into a last save and a clean exit.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from common import mesh as mesh_lib
from common.errors import MissingFileError, WorkdirError

TMP_MARKER = '.orbax-checkpoint-tmp'


def remove_tmp_checkpoints(directory: str | Path) -> list[Path]:
  """Deletes leftovers of killed saves; returns what was removed."""
  directory = Path(directory)
  removed = []
  if directory.is_dir() and jax.process_index() == 0:
    for p in directory.iterdir():
      if TMP_MARKER in p.name:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
  if removed:
    logging.warning('Removed %d incomplete checkpoint folder(s) from a killed save: %s',
                    len(removed), ', '.join(p.name for p in removed))
  return removed


class Checkpointer:
  """Keeps the last `keep` checkpoints of a train state, saved every `save_every` steps."""

  def __init__(self, workdir: str | Path, save_every: int = 1, keep: int = 3,
               async_save: bool = True, read_only: bool = False):
    """`read_only` (sampling, evaluation) touches nothing on disk: a training run
    writing into the same workdir keeps its in-progress save."""
    self.directory = Path(workdir).absolute() / 'checkpoints'
    if not read_only:
      remove_tmp_checkpoints(self.directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=None if read_only else keep,
            enable_async_checkpointing=async_save and not read_only,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        ))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore(self, target: Any, step: int | None = None) -> Any | None:
    """Restores into the structure, dtypes and shardings of `target`.

    `target` is a concrete state or its `jax.eval_shape`; returns None when
    there is nothing to restore. Leaves without a sharding are restored
    replicated on this run's devices, whatever topology saved them (train on
    8 GPUs, sample on 1).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    replicated = mesh_lib.replicated(mesh_lib.make_mesh())
    abstract = jax.tree.map(lambda x: _abstract(x, replicated), target)
    logging.info('Restoring checkpoint of step %d from %s.', step, self.directory)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:  # Orbax: the tree does not fit the target.
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      raise WorkdirError(
          f'The checkpoint {self.directory / str(step)} does not fit this config\'s train state '
          f'(another model, other params.trainable/lr_multipliers rules, or an older version of '
          f'this code wrote it): {first}. Use a new --workdir.') from e

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it did."""
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_latest(workdir: str | Path, target: Any, how_to_train: str) -> Any:
  """The latest checkpoint of another run's workdir, read-only (sampling, stage 2).

  Raises MissingFileError (a FileNotFoundError) naming the workdir and `how_to_train`
  when there is none.
  """
  ckpt = Checkpointer(workdir, read_only=True) if (Path(workdir) / 'checkpoints').is_dir() else None
  try:
    state = ckpt.restore(target) if ckpt else None
  finally:
    if ckpt:
      ckpt.close()
  if state is None:
    raise MissingFileError(f'No checkpoint in {Path(workdir) / "checkpoints"}: {how_to_train}')
  return state


def _abstract(x, default_sharding):
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, (np.ndarray, jax.ShapeDtypeStruct)):
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=getattr(x, 'sharding', None) or default_sharding)
  return x


class PreemptionGuard:
  """Records SIGTERM (and SIGINT) so the loop can save and stop at a step boundary.

  Use as a context manager around the train loop and poll ``should_stop(step)``.
  On several hosts the flag is agreed every `sync_every` steps, so all
  processes stop at the same step and write the same checkpoint.
  """

  def __init__(self, sync_every: int = 10, signals=(signal.SIGTERM, signal.SIGINT)):
    self.sync_every = sync_every
    self.signals = signals
    self.stopped_at: int | None = None  # Set by common.loop.run when it stops on request.
    self._event = threading.Event()
    self._previous = {}

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning('Received signal %d: saving a checkpoint and stopping.', signum)
    self._event.set()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous.clear()
    return False

  def request_stop(self) -> None:
    self._event.set()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1 and step % self.sync_every:
      return False
    return self.stop_requested()

  def stop_requested(self) -> bool:
    """Whether a process has been signalled; on several hosts agreed by all (each must call
    it at the same point)."""
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.array([local]))))
