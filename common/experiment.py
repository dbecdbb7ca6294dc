"""The one training driver: `train_and_evaluate(experiment, workdir)`.

Each model family (ddpm, latent's two stages, StyleGAN) subclasses `Experiment`
and supplies what is its own: validation, data, the train state's creation, the
step function(s), constant inputs (frozen networks), periodic hooks and a final
action. The driver does the rest the same way for all of them, in an order
that never loses a good run's files to a failing one:

  validate -> check the workdir's run keys -> mesh -> data -> parameter rules
  checked on the abstract state -> restore (sharded, any topology) or initialise
  -> config.json and the model's records -> parameter tables -> common.loop.run -> finish
  (only once the run is complete: after a SIGTERM stop the checkpoint alone is written, and
  the rerun that reaches the last step, or finds it reached, finishes).

The state's layout over the mesh comes from `mesh.state_shardings` on the
state's `jax.eval_shape` and `config.params` (common.params), nowhere else:
creation, the jitted step, restore and sampling (`restore_for_sampling`) use it.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections

from common import checkpoint, logs, loop, mesh as mesh_lib, optim
from common import params as params_lib

# Settings every run's checkpoints depend on: the rules decide which parameters have
# optimiser state and how it is grouped (the mesh and sharding rules may change).
RUN_KEYS = ('params.trainable', 'params.lr_multipliers')


class Experiment:
  """What a model family supplies; see the module docstring for the order of calls.

  Set by the driver before `setup`: `self.mesh`, `self.rules`, `self.workdir`.
  """
  name = 'model'             # "initialising the <name>", "compiling the <name> train step".
  run_keys: Sequence[str] = ()

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.rules = params_lib.Rules(config.get('params'))
    self.mesh = None
    self.workdir: Path | None = None

  # -- to override ----------------------------------------------------------------------

  def validate(self) -> None:
    """Checks the config (keys, values), naming the offending key; before anything else."""

  def setup(self) -> None:
    """Loads and checks the data and frozen inputs (after the mesh, before the state)."""

  def record(self) -> None:
    """Writes the run's records beside config.json (once every check has passed)."""

  def init_state(self) -> Any:
    """The fresh train state from config.seed; pure (run under eval_shape and jit)."""
    raise NotImplementedError

  def param_trees(self, state) -> dict[str, Any]:
    """{net name: parameters} of a (possibly abstract) state: what the rules address."""
    return {self.name: state.params}

  def make_step(self, shardings):
    """The step: a function for `loop.jit_step`-style use, or an object with `compile`."""
    raise NotImplementedError

  def batches(self, start: int):
    """This process's rows of the global batches from step `start` on."""
    raise NotImplementedError

  def constants(self) -> tuple:
    """Extra step arguments (frozen weights), placed on the mesh."""
    return ()

  def hooks(self, writer) -> list[loop.Hook]:
    return []

  def scalars(self, step: int) -> dict:
    """Host-side scalars logged with the metrics: by default config.optim's learning rate."""
    if self._learning_rate is None:
      return {}
    return {'learning_rate': float(self._learning_rate(step))}

  @functools.cached_property
  def _learning_rate(self):
    return (optim.learning_rate_schedule(self.config.optim, self.config.train.num_steps)
            if 'optim' in self.config else None)

  def finish(self, state, ckpt: checkpoint.Checkpointer, writer, start: int):
    """After the last step (e.g. stage 1's latent scale factor); returns the state. Not after
    a preemption (SIGTERM) stop: then the rerun that completes the run calls it."""
    return state

  # -- shared ---------------------------------------------------------------------------

  def abstract_state(self):
    """The state's shapes and dtypes, with the shardings it lives in on `self.mesh`."""
    shapes = jax.eval_shape(self.init_state)
    shardings = mesh_lib.state_shardings(shapes, self.mesh, self.rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)

  def create_state(self):
    """init_state, computed directly in its shardings (no host round trip)."""
    shardings = jax.tree.map(lambda s: s.sharding, self.abstract_state())
    return jax.jit(self.init_state, out_shardings=shardings)()


def train_and_evaluate(exp: Experiment, workdir: str | Path):
  """Trains `exp` in `workdir` (resuming from its last checkpoint); returns the final state."""
  config, t = exp.config, exp.config.train
  exp.validate()
  workdir = Path(workdir)
  exp.workdir = workdir
  loop.check_workdir(config, workdir, tuple(exp.run_keys) + RUN_KEYS)
  exp.mesh = mesh_lib.make_mesh(config.get('mesh'))
  mesh_lib.check_batch_size(t.batch_size, exp.mesh, 'train.batch_size')
  exp.setup()

  abstract = exp.abstract_state()
  exp.rules.check(exp.param_trees(abstract))  # Config errors, before any compute.
  shardings = jax.tree.map(lambda s: s.sharding, abstract)
  ckpt = checkpoint.Checkpointer(workdir, t.checkpoint_every, t.keep_checkpoints,
                                 t.async_checkpoint)
  try:
    with logs.Timed(f'initialising the {exp.name}'):
      state = ckpt.restore(abstract)
      if state is None:
        state = exp.create_state()
    start = int(state.step)
    if start:
      logging.info('Resumed from step %d.', start)
    loop.record_config(config, workdir)  # Only now: everything above has been checked.
    exp.record()

    writer = logs.make_writer(workdir)
    trees = exp.param_trees(state)
    for net, tree in trees.items():
      logs.log_parameter_overview(tree, net, workdir)
    if exp.rules.trainable:
      trained, frozen = exp.rules.counts(trees)
      logging.info('Trainable %s parameters, frozen %s (%.2f%% trained):\n%s', f'{trained:,}',
                   f'{frozen:,}', 100.0 * trained / max(trained + frozen, 1),
                   exp.rules.table(trees))
    if exp.mesh.shape[mesh_lib.FSDP_AXIS] > 1:
      logging.info('State sharded over fsdp=%d: %.1f MiB per device.',
                   exp.mesh.shape[mesh_lib.FSDP_AXIS], mesh_lib.per_device_bytes(state) / 2**20)
    try:
      guard = checkpoint.PreemptionGuard()
      state = loop.run(
          state, exp.make_step(shardings), exp.batches(start), mesh=exp.mesh,
          num_steps=t.num_steps, ckpt=ckpt, writer=writer, log_every=t.log_every,
          checkpoint_every=t.checkpoint_every, items_per_step=t.batch_size, start=start,
          hooks=exp.hooks(writer), scalars_fn=exp.scalars, name=f'{exp.name} train step',
          constants=exp.constants(), guard=guard)
      if guard.stopped_at is None:
        state = exp.finish(state, ckpt, writer, start)
      else:  # Preempted: the grace period is for the checkpoint (written), not the artefacts.
        logging.info('Stopped at step %d: %s runs when the rerun completes the run.',
                     guard.stopped_at, f'{type(exp).__name__}.finish')
    finally:
      writer.flush()
  finally:
    ckpt.close()
  return state


def restore_for_sampling(exp: Experiment, workdir: str | Path, how_to_train: str):
  """The latest checkpoint of `workdir`, read-only, laid out on `exp`'s mesh (built from
  config.mesh when not set): a run trained on 8 devices samples on 1, and the reverse."""
  if exp.mesh is None:
    exp.mesh = mesh_lib.make_mesh(exp.config.get('mesh'))
  return checkpoint.restore_latest(workdir, exp.abstract_state(), how_to_train)
