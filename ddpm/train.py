"""Training a DDPM: `train_and_evaluate(config, workdir)`.

The train state holds the parameters, their EMA (what sampling uses), the
optimiser state, the step and the base RNG key. Each step's randomness is
`fold_in(rng, step)` and its batch a function of (seed, step), so a run
resumed from a checkpoint continues bit for bit like one that never stopped.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from common import augment, data, imageio, logs, loop, mesh as mesh_lib, optim
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
  metrics = {'loss': loss, 'mse': aux['mse'], 'grad_norm': optax.global_norm(grads)}
  return apply_gradients(state, grads, tx, config.train), metrics


def apply_gradients(state: TrainState, grads, tx, t: ml_collections.ConfigDict) -> TrainState:
  """The optimiser update, then the EMA (every t.ema_every steps), and step + 1."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optim.ema_step(state.step, state.ema_params, params, t.ema_every, t.ema_decay,
                              t.ema_warmup)
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                       opt_state=opt_state)


def make_train_step(config, model, schedule, tx, mesh):
  step = functools.partial(train_step, config=config, model=model, schedule=schedule, tx=tx)
  return loop.jit_step(step, mesh)


def make_sample_fn(config, model, schedule, num_snapshots: int = 0, **overrides):
  """jit(fn(params, rng, x_T) -> x_0 in [-1, 1]) with the config's sampler settings."""
  kwargs = samplers.options_from_config(config, num_snapshots=num_snapshots, **overrides)

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
  loop.check_workdir(config, workdir, default_config.RUN_KEYS)

  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(config.train.batch_size, mesh, 'train.batch_size')
  images = data.load_dataset(config.data)

  model, schedule, tx = build_model(config), build_schedule(config), make_optimizer(config)
  with logs.Timed('initialising the U-Net'):
    ckpt, state, start = loop.resume(workdir, create_train_state(config, model, tx, mesh),
                                     config.train)
  workdir = loop.record_config(config, workdir)  # Only now: everything above has been checked.

  writer = logs.make_writer(workdir)
  logs.log_parameter_overview(state.params, 'U-Net', workdir)
  step_fn = make_train_step(config, model, schedule, tx, mesh)
  grid_fn = make_sample_fn(config, model, schedule) if config.train.sample_every else None
  grid_noise = noise_like_batch(jax.random.PRNGKey(config.seed + 1),
                                config.train.num_grid_samples, config)

  t = config.train
  learning_rate = optim.learning_rate_schedule(config.optim, t.num_steps)

  def write_grid(step, state):
    x = grid_fn(state.ema_params, jax.random.PRNGKey(config.seed + 2), grid_noise)
    grid = imageio.make_grid(imageio.to_uint8(mesh_lib.gather(x)))
    logs.write_image_grid(writer, step, 'ema_samples', grid)
    if jax.process_index() == 0:
      imageio.save_image(grid, workdir / 'samples_during_training' / f'{step:08d}.png')

  try:
    state = loop.run(
        state, step_fn, data.BatchIterator(images, t.batch_size, seed=config.seed, step=start),
        mesh=mesh, num_steps=t.num_steps, ckpt=ckpt, writer=writer, log_every=t.log_every,
        checkpoint_every=t.checkpoint_every, items_per_step=t.batch_size, start=start,
        hooks=[loop.Hook(t.sample_every, write_grid, 'sampling the EMA grid')],
        scalars_fn=lambda step: {'learning_rate': float(learning_rate(step))})
  finally:
    ckpt.close()
    writer.flush()
  return state
