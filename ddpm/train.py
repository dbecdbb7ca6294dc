"""Training a DDPM: `train_and_evaluate(config, workdir)`.

The train state holds the parameters, the EMA (what sampling uses) and
optimiser state of the trainable ones (config.params), the step and the base RNG
key. Each step's randomness is
`fold_in(rng, step)` and its batch a function of (seed, step), so a run
resumed from a checkpoint continues bit for bit like one that never stopped.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from common import augment, data, experiment, imageio, logs, loop, lora, mesh as mesh_lib, optim
from common import params as params_lib
from ddpm import diffusion, models, samplers, schedules
from ddpm.configs import default as default_config


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  ema_params: Any  # EMA of the trainable parameters (all of them by default).
  opt_state: Any   # Of the trainable parameters only.
  rng: jax.Array  # Base key: never advanced, folded with the step.


def build_model(config: ml_collections.ConfigDict,
                cls: type[models.UNet] = models.UNet) -> models.UNet:
  """The config's U-Net; `cls` a subclass of the same attributes (ddpm.sr.SRUNet)."""
  m = config.model
  return cls(
      sample_size=config.data.image_size,
      block_out_channels=tuple(m.block_out_channels),
      layers_per_block=m.layers_per_block,
      attention_resolutions=tuple(m.attention_resolutions),
      head_dim=m.head_dim,
      mid_attention=m.mid_attention,
      norm_groups=m.norm_groups,
      dropout=m.dropout,
      dtype=jnp.bfloat16 if m.dtype == 'bfloat16' else jnp.float32,
      remat=m.remat)


def build_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
  return schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


def make_optimizer(config, rules: params_lib.Rules | None = None) -> optax.GradientTransformation:
  return optim.make_optimizer(config.optim, config.train.num_steps, rules or rules_of(config))


def rules_of(config) -> params_lib.Rules:
  return params_lib.Rules(config.get('params'))


def init_state(config, model: models.UNet, tx: optax.GradientTransformation,
               rules: params_lib.Rules | None = None, **inputs) -> TrainState:
  """`inputs`: example values of the model's other keyword inputs (ddpm.sr's low_res)."""
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  size = config.data.image_size
  params = model.init(init_rng, jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32),
                      **inputs)['params']
  return new_state(params, tx, rules or rules_of(config), state_rng)


def new_state(params, tx, rules: params_lib.Rules, rng) -> TrainState:
  """Step 0 of `params`: EMA and optimiser state of the trainable parameters only."""
  trainable, _ = rules.split(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=trainable,
                    opt_state=tx.init(trainable), rng=rng)


def state_shardings(config, init_fn: Callable[[], TrainState], mesh):
  """Where each array of the state lives on `mesh` (common.mesh.state_shardings)."""
  return mesh_lib.state_shardings(jax.eval_shape(init_fn), mesh, rules_of(config))


def create_train_state(config, model, tx, mesh) -> TrainState:
  """Initialises the state directly in its shardings on the mesh (no host round trip)."""
  init = functools.partial(init_state, config, model, tx)
  return jax.jit(init, out_shardings=state_shardings(config, init, mesh))()


def train_step(state: TrainState, batch: jnp.ndarray, *, config, model, schedule, tx,
               rules: params_lib.Rules, condition: Callable | None = None):
  """One optimisation step on a uint8 [B, H, W, 3] batch.

  Every random draw is made for the whole batch before the loss, and dropout's masks per
  example (`optim.value_and_grad`'s `rng`: row i's from fold_in(the layer's key, i)), so
  accumulating gradients over train.grad_accum_steps micro-batches gives the big batch's
  update.
  `condition(rng, x0) -> {name: [B, ...]}` makes the model's other keyword inputs from the
  (augmented) batch, e.g. ddpm.sr's noised low-resolution copy and its noise level.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  # Four keys, each used once: the condition's is not derived from a key that was split
  # (fold_in(rng, 1) is split(rng, n)[1], the loss's key, with JAX's partitionable threefry).
  aug_rng, loss_rng, dropout_rng, condition_rng = jax.random.split(rng, 4)
  x0 = imageio.to_unit(batch)
  x0 = augment.augment(aug_rng, x0, config.augment)
  t, eps = diffusion.draw_t_eps(schedule, loss_rng, x0)
  inputs = {} if condition is None else condition(condition_rng, x0)

  def loss_fn(params, b, dropout_rng):
    params = lora.merged(params)  # W + scale A B where adapters are (common.lora); else itself.
    model_fn = lambda xt, t: model.apply({'params': params}, xt, t, train=True,
                                         rngs={'dropout': dropout_rng},
                                         **{k: b[k] for k in inputs})
    return diffusion.denoising_loss(schedule, model_fn, b['x0'], b['t'], b['eps'],
                                    config.diffusion.prediction, config.diffusion.min_snr_gamma)

  # With rng, every dropout mask is drawn per example (optim.value_and_grad).
  (loss, aux), grads = optim.value_and_grad(loss_fn, state.params, rules,
                                            {'x0': x0, 't': t, 'eps': eps, **inputs},
                                            config.train.grad_accum_steps, rng=dropout_rng)
  metrics = {'loss': loss, 'mse': aux['mse'], 'grad_norm': optax.global_norm(grads)}
  return apply_gradients(state, grads, tx, config.train, rules), metrics


def apply_gradients(state: TrainState, grads, tx, t: ml_collections.ConfigDict,
                    rules: params_lib.Rules) -> TrainState:
  """The optimiser update of the trainable parameters, then their EMA (every t.ema_every
  steps), and step + 1."""
  params, opt_state = optim.apply_gradients(tx, grads, state.opt_state, state.params, rules)
  ema_params = optim.ema_step(state.step, state.ema_params, rules.split(params)[0],
                              t.ema_every, t.ema_decay, t.ema_warmup)
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                       opt_state=opt_state)


def make_train_step(config, model, schedule, tx, mesh, shardings=None, condition=None,
                    rules: params_lib.Rules | None = None):
  """The jitted step, the state laid out as `create_train_state` lays it out."""
  rules = rules or rules_of(config)
  if shardings is None:
    shardings = state_shardings(config, functools.partial(init_state, config, model, tx), mesh)
  step = functools.partial(train_step, config=config, model=model, schedule=schedule, tx=tx,
                           rules=rules, condition=condition)
  return loop.jit_step(step, mesh, shardings)


def make_sample_fn(config, model, schedule, num_snapshots: int = 0, **overrides):
  """jit(fn(params, rng, x_T, **inputs) -> x_0 in [-1, 1]) with the config's sampler settings;
  `inputs` are the model's other keyword inputs (ddpm.sr's low_res and noise_level)."""
  kwargs = samplers.options_from_config(config, num_snapshots=num_snapshots, **overrides)

  def sample_fn(params, rng, x_T, **inputs):
    params = lora.merged(params)
    model_fn = lambda x, t: model.apply({'params': params}, x, t, **inputs)
    return samplers.sample(schedule, model_fn, x_T, rng, **kwargs)

  return jax.jit(sample_fn)


def noise_like_batch(rng, n: int, config) -> jnp.ndarray:
  size = config.data.image_size
  return jax.random.normal(rng, (n, size, size, 3))


class Experiment(experiment.Experiment):
  """Pixel-space DDPM: the U-Net, its EMA, one step, EMA sample grids."""
  name = 'U-Net'
  run_keys = default_config.RUN_KEYS

  def validate(self):
    default_config.validate(self.config)

  def setup(self):
    self.images = data.load_dataset(self.config.data)

  @functools.cached_property
  def model(self):
    return build_model(self.config)

  @functools.cached_property
  def schedule(self):
    return build_schedule(self.config)

  @functools.cached_property
  def tx(self):
    return make_optimizer(self.config, self.rules)

  def sampling_params(self, workdir, use_ema: bool = True):
    """The parameters to sample with (EMA by default) from the workdir's latest checkpoint,
    laid out on this config's mesh."""
    state = experiment.restore_for_sampling(
        self, workdir, 'train first with --mode=train and the same --workdir.')
    logging.info('Sampling with the %s parameters of step %d.', 'EMA' if use_ema else 'raw',
                 int(state.step))
    return self.rules.of_state(state, use_ema)

  def init_state(self):
    return init_state(self.config, self.model, self.tx, self.rules)

  def make_step(self, shardings):
    return make_train_step(self.config, self.model, self.schedule, self.tx, self.mesh, shardings,
                           rules=self.rules)

  def batches(self, start):
    return data.BatchIterator(self.images, self.config.train.batch_size, seed=self.config.seed,
                              step=start)

  def hooks(self, writer):
    config = self.config
    if not config.train.sample_every:
      return []
    grid_fn = make_sample_fn(config, self.model, self.schedule)
    grid_noise = noise_like_batch(jax.random.PRNGKey(config.seed + 1),
                                  config.train.num_grid_samples, config)

    def write_grid(step, state):
      params = self.rules.of_state(state)
      x = grid_fn(params, jax.random.PRNGKey(config.seed + 2), grid_noise)
      grid = imageio.make_grid(imageio.to_uint8(mesh_lib.gather(x)))
      logs.write_image_grid(writer, step, 'ema_samples', grid)
      if jax.process_index() == 0:
        imageio.save_image(grid, self.workdir / 'samples_during_training' / f'{step:08d}.png')

    return [loop.Hook(config.train.sample_every, write_grid, 'sampling the EMA grid')]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from the workdir's last checkpoint) and returns the final state."""
  return experiment.train_and_evaluate(Experiment(config), workdir)
