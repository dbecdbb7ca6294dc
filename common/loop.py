"""The training loop every trainer shares (ddpm, latent's two stages, StyleGAN), driven by
common.experiment.

One compiled step function is applied to sharded batches; around it the loop
logs averaged metrics with steps/s and ETA, stops on a non-finite metric
without saving the bad state, checkpoints on schedule and on SIGTERM, and runs
periodic hooks (sample grids, reconstructions) whose time is kept out of the
steps/s figure.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from common import atomic, checkpoint, errors, logs, mesh as mesh_lib
from common import config as config_lib


def _as_json(config) -> dict:
  """The config as config.json holds it (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict(), default=list))


def check_workdir(config, workdir: str | Path, run_keys: Sequence[str]) -> None:
  """Refuses to resume a workdir's run with settings that make its checkpoints meaningless.

  Call before anything is written. If `workdir` holds a run (checkpoints and
  the config.json of the run that wrote them), every key under `run_keys`
  (prefixes: 'model' covers 'model.*') must be unchanged: otherwise a
  WorkdirError lists the differences. Other changes (more steps, logging,
  learning rate) are allowed and logged.
  """
  workdir = Path(workdir)
  record = workdir / 'config.json'
  if not (record.is_file() and any((workdir / 'checkpoints').glob('[0-9]*'))):
    return
  old = config_lib.flatten(json.loads(record.read_text()))
  new = config_lib.flatten(_as_json(config))
  changed = sorted(k for k in old.keys() | new.keys()
                   if old.get(k, '<unset>') != new.get(k, '<unset>'))
  fixed = [k for k in changed if any(k == p or k.startswith(p + '.') for p in run_keys)]
  describe = lambda ks: ', '.join(f'{k} {old.get(k, "<unset>")!r} -> {new.get(k, "<unset>")!r}'
                                  for k in ks)
  if fixed:
    raise errors.WorkdirError(
        f'{workdir} holds a run with other settings: {describe(fixed)}. Its checkpoints do '
        'not fit this config: use a new --workdir, or the run\'s own values.')
  if changed:
    logging.info('Resuming %s with changed settings: %s.', workdir, describe(changed))


def record_config(config, workdir: str | Path) -> Path:
  """Writes WORKDIR/config.json (read back by sampling and stage 2).

  Call once the config, the data and any existing checkpoint have all been
  checked, so a run that fails early never rewrites the record of a good one.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    text = json.dumps(config.to_dict(), indent=2, default=list)
    # Atomic: a kill never leaves half a record.
    atomic.write_file(workdir / 'config.json', lambda tmp: tmp.write_text(text))
  return workdir


def jit_step(step_fn: Callable, mesh, state_shardings=None, constant_shardings: Sequence = (),
             donate: bool = True):
  """jit(step_fn(state, batch, *constants) -> (state, metrics)) with the state laid out by
  `state_shardings` (from `mesh.state_shardings`; None: replicated), the batch split over
  every device, and the metrics replicated. XLA inserts the gathers and reduce-scatters
  that fsdp-sharded parameters need.

  Constants (frozen weights: a VAE, LPIPS) are arguments rather than closed-over
  values, so they are not baked into the compiled program as literals.
  """
  replicated = mesh_lib.replicated(mesh)
  state_shardings = replicated if state_shardings is None else state_shardings
  return jax.jit(step_fn,
                 in_shardings=(state_shardings, mesh_lib.data_sharding(mesh),
                               *constant_shardings),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=0 if donate else ())


@dataclasses.dataclass
class Hook:
  """`fn(step, state)` every `every` steps and at the last step (every=0: never).

  `what` (e.g. 'sampling the EMA grid') is logged with the time it took: hooks can run
  for a while (their first call compiles), and the console should say why it is quiet.
  """
  every: int
  fn: Callable[[int, Any], None]
  what: str = ''


def run(state, step_fn: Callable, batches: Iterator, *, mesh, num_steps: int,
        ckpt: checkpoint.Checkpointer, writer, log_every: int, checkpoint_every: int,
        items_per_step: int = 0, start: int = 0, hooks: Sequence[Hook] = (),
        scalars_fn: Callable[[int], dict] | None = None, name: str = 'train step',
        constants: Sequence[Any] = (), guard: checkpoint.PreemptionGuard | None = None):
  """Runs `state, metrics = step_fn(state, batch, *constants)` from `start` to `num_steps`.

  `step_fn` is a jitted function whose state argument is donated, or an object whose
  `compile(state, batch, *constants)` returns `fn(state, batch, step) -> (state, metrics)`
  (a step of several compiled phases, as StyleGAN's); `batches` yields this process's
  rows of each global batch (a pytree of numpy arrays). Metrics may differ between
  steps (lazy regularisation): each is averaged over the steps that reported it.
  `scalars_fn(step)` adds host-side scalars (e.g. the learning rate) to the logs;
  `constants` are the step's frozen extra arguments (see `jit_step`).
  Returns the final state. On SIGTERM it saves and returns early; rerunning
  the same command resumes. `guard` (a fresh `checkpoint.PreemptionGuard` by default)
  watches for the signal; its `stopped_at` is the step a stop was made at, else None.
  """
  progress = logs.Progress(num_steps, writer, start, items_per_step=items_per_step)
  pending: list[dict] = []  # Device metrics since the last check, fetched lazily.

  def check_pending(step) -> dict:
    """Averages and NaN-checks the pending metrics (before every log and save)."""
    if not pending:
      return {}
    fetched = jax.device_get(pending)
    pending.clear()
    keys = dict.fromkeys(k for m in fetched for k in m)
    mean = {k: float(np.mean([m[k] for m in fetched if k in m])) for k in keys}
    worst = {k: float(np.max(np.abs([m[k] for m in fetched if k in m]))) for k in keys}
    logs.check_finite(step, worst)
    return mean

  step = start
  if step >= num_steps:
    return state
  # Compile before the loop (steps/s then excludes it) and line the hosts up after it.
  batch = mesh_lib.shard_batch(next(batches), mesh)
  with logs.Timed(f'compiling the {name}'):
    if hasattr(step_fn, 'lower'):
      compiled = step_fn.lower(state, batch, *constants).compile()
      step_fn = lambda state, batch, step: compiled(state, batch, *constants)
    else:
      step_fn = step_fn.compile(state, batch, *constants)
  mesh_lib.barrier(f'{name} compiled')
  progress.reset_timer(start)

  guard = checkpoint.PreemptionGuard() if guard is None else guard
  with guard:
    while step < num_steps:
      if batch is None:
        batch = mesh_lib.shard_batch(next(batches), mesh)
      state, metrics = step_fn(state, batch, step)
      batch = None
      pending.append(metrics)
      step += 1
      last = step == num_steps
      if step % log_every == 0 or last:
        scalars = check_pending(step)
        if scalars_fn:
          scalars.update(scalars_fn(step))
        progress.update(step, scalars)
      stopping = guard.should_stop(step)
      if step % checkpoint_every == 0 or last or stopping:
        check_pending(step)  # Never save a state whose loss went NaN.
        ckpt.save(step, state, force=True)
      ran_hook = False
      for hook in hooks:
        if hook.every and (step % hook.every == 0 or last):
          with logs.Timed(f'{hook.what or hook.fn.__name__} at step {step}'):
            hook.fn(step, state)
          ran_hook = True
      if ran_hook:
        progress.reset_timer(step)
      if stopping:
        guard.stopped_at = step
        logging.warning('Stopped at step %d on request; rerun the same command to resume.', step)
        break
    if guard.stopped_at is None and guard.stop_requested():
      # Signalled during the last step's hooks: its checkpoint is written, the run is over,
      # and the grace period is not spent on the experiment's final actions either.
      guard.stopped_at = step
      logging.warning('Stop requested at the last step %d: its checkpoint is written.', step)
  return state
