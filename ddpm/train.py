"""Training a DDPM: `train_and_evaluate(config, workdir)`.

The train state holds the parameters, their EMA (what sampling uses), the
optimiser state, the step and the base RNG key. Each step's randomness is
`fold_in(rng, step)` and its batch a function of (seed, step), so a run
resumed from a checkpoint continues bit for bit like one that never stopped.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from common import augment, checkpoint, data, imageio, logs, mesh as mesh_lib, optim
from ddpm import diffusion, models, samplers, schedules
from ddpm.configs import default as default_config


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array  # Base key: never advanced, folded with the step.


def build_model(config: ml_collections.ConfigDict) -> models.UNet:
  m = config.model
  return models.UNet(
      sample_size=config.data.image_size,
      block_out_channels=tuple(m.block_out_channels),
      layers_per_block=m.layers_per_block,
      attention_resolutions=tuple(m.attention_resolutions),
      head_dim=m.head_dim,
      mid_attention=m.mid_attention,
      norm_groups=m.norm_groups,
      dropout=m.dropout,
      dtype=jnp.bfloat16 if m.dtype == 'bfloat16' else jnp.float32)


def build_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
  return schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


def make_optimizer(config) -> optax.GradientTransformation:
  return optim.make_optimizer(config.optim, config.train.num_steps)


def init_state(config, model: models.UNet, tx: optax.GradientTransformation) -> TrainState:
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  size = config.data.image_size
  params = model.init(init_rng, jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32))['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params), rng=state_rng)


def create_train_state(config, model, tx, mesh) -> TrainState:
  """Initialises the state directly replicated on the mesh (no host round trip)."""
  return jax.jit(functools.partial(init_state, config, model, tx),
                 out_shardings=mesh_lib.replicated(mesh))()


def train_step(state: TrainState, batch: jnp.ndarray, *, config, model, schedule, tx):
  """One optimisation step on a uint8 [B, H, W, 3] batch."""
  rng = jax.random.fold_in(state.rng, state.step)
  aug_rng, loss_rng, dropout_rng = jax.random.split(rng, 3)
  x0 = batch.astype(jnp.float32) / 127.5 - 1.0
  x0 = augment.augment(aug_rng, x0, config.augment)

  def loss_fn(params):
    model_fn = lambda xt, t: model.apply({'params': params}, xt, t, train=True,
                                         rngs={'dropout': dropout_rng})
    return diffusion.diffusion_loss(schedule, model_fn, x0, loss_rng,
                                    config.diffusion.prediction, config.diffusion.min_snr_gamma)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  t = config.train
  decay = optim.ema_decay(state.step // t.ema_every, t.ema_decay, t.ema_warmup)
  do_ema = (state.step + 1) % t.ema_every == 0
  ema_params = jax.tree.map(lambda new, old: jnp.where(do_ema, new, old),
                            optim.ema_update(state.ema_params, params, decay), state.ema_params)
  metrics = {'loss': loss, 'mse': aux['mse'], 'grad_norm': optax.global_norm(grads)}
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                       opt_state=opt_state), metrics


def make_train_step(config, model, schedule, tx, mesh):
  step = functools.partial(train_step, config=config, model=model, schedule=schedule, tx=tx)
  return jax.jit(step,
                 in_shardings=(mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)),
                 out_shardings=(mesh_lib.replicated(mesh), mesh_lib.replicated(mesh)),
                 donate_argnums=0)


def make_sample_fn(config, model, schedule, num_snapshots: int = 0, **overrides):
  """jit(fn(params, rng, x_T) -> x_0 in [-1, 1]) with the config's sampler settings."""
  s = config.sample
  kwargs = dict(sampler=s.sampler, num_steps=s.num_steps, eta=s.eta, spacing=s.spacing,
                prediction=config.diffusion.prediction, clip_x0=s.clip_x0,
                ddpm_variance=s.ddpm_variance, num_snapshots=num_snapshots)
  kwargs.update(overrides)

  def sample_fn(params, rng, x_T):
    model_fn = lambda x, t: model.apply({'params': params}, x, t)
    return samplers.sample(schedule, model_fn, x_T, rng, **kwargs)

  return jax.jit(sample_fn)


def noise_like_batch(rng, n: int, config) -> jnp.ndarray:
  size = config.data.image_size
  return jax.random.normal(rng, (n, size, size, 3))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from the workdir's last checkpoint) and returns the final state."""
  default_config.validate(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / 'config.json').write_text(json.dumps(config.to_dict(), indent=2, default=list))

  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(config.train.batch_size, mesh, 'train.batch_size')
  images = data.load_dataset(config.data)

  model, schedule, tx = build_model(config), build_schedule(config), make_optimizer(config)
  ckpt = checkpoint.Checkpointer(workdir, config.train.checkpoint_every,
                                 config.train.keep_checkpoints, config.train.async_checkpoint)
  state = create_train_state(config, model, tx, mesh)
  state = ckpt.restore(state) or state
  start = int(state.step)
  if start:
    logging.info('Resumed from step %d.', start)

  writer = logs.make_writer(workdir)
  logs.log_parameter_overview(state.params, 'U-Net')
  step_fn = make_train_step(config, model, schedule, tx, mesh)
  grid_fn = make_sample_fn(config, model, schedule) if config.train.sample_every else None
  grid_noise = noise_like_batch(jax.random.PRNGKey(config.seed + 1),
                                config.train.num_grid_samples, config)

  t = config.train
  batches = data.BatchIterator(images, t.batch_size, seed=config.seed, step=start)
  progress = logs.Progress(t.num_steps, writer, start, items_per_step=t.batch_size)
  learning_rate = optim.learning_rate_schedule(config.optim, t.num_steps)
  pending: list[dict] = []  # Device metrics since the last check, fetched lazily.

  def check_pending(step) -> dict:
    """Averages and NaN-checks the pending metrics (before every log and save)."""
    if not pending:
      return {}
    fetched = jax.device_get(pending)
    pending.clear()
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    worst = {k: float(np.max(np.abs([m[k] for m in fetched]))) for k in fetched[0]}
    logs.check_finite(step, worst)
    return mean

  # Compile before the loop (steps/s then excludes it) and line the hosts up after it.
  batch_shape = jax.ShapeDtypeStruct((t.batch_size, *images.shape[1:]), images.dtype,
                                     sharding=mesh_lib.data_sharding(mesh))
  step_fn = step_fn.lower(state, batch_shape).compile()
  mesh_lib.barrier('ddpm train step compiled')
  progress.reset_timer(start)

  step = start
  try:
    with checkpoint.PreemptionGuard() as guard:
      while step < t.num_steps:
        batch = mesh_lib.shard_batch(next(batches), mesh)
        state, metrics = step_fn(state, batch)
        pending.append(metrics)
        step += 1
        if step % t.log_every == 0 or step == t.num_steps:
          scalars = check_pending(step)
          scalars['learning_rate'] = float(learning_rate(step))
          progress.update(step, scalars)
        stopping = guard.should_stop(step)
        if step % t.checkpoint_every == 0 or step == t.num_steps or stopping:
          check_pending(step)  # Never save a state whose loss went NaN.
          ckpt.save(step, state, force=True)
        if t.sample_every and (step % t.sample_every == 0 or step == t.num_steps):
          x = grid_fn(state.ema_params, jax.random.PRNGKey(config.seed + 2), grid_noise)
          grid = imageio.make_grid(imageio.to_uint8(mesh_lib.gather(x)))
          logs.write_image_grid(writer, step, 'ema_samples', grid)
          if jax.process_index() == 0:
            imageio.save_image(grid, workdir / 'samples_during_training' / f'{step:08d}.png')
          progress.reset_timer(step)
        if stopping:
          logging.warning('Stopped at step %d on request; rerun the same command to resume.', step)
          break
  finally:
    ckpt.close()
    writer.flush()
  return state
