"""Optimiser with warm-up and clipping, and EMA of parameters (shared by trainers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from common import config as config_lib
from common.errors import ConfigError

OPTIMIZERS = ('adam', 'adamw')
LR_SCHEDULES = ('constant', 'cosine')


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'adam'
  c.learning_rate = 2e-4
  c.lr_schedule = 'constant'  # After warm-up: constant, or cosine decay to 0 at the last step.
  c.warmup_steps = 1000
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.0        # adamw only.
  c.grad_clip_norm = 1.0      # 0 = no clipping.
  return c


def validate(c: ml_collections.ConfigDict, prefix: str = 'optim') -> None:
  config_lib.check_keys(c, get_config(), prefix)
  config_lib.check_choice(c.name, OPTIMIZERS, f'{prefix}.name')
  config_lib.check_choice(c.lr_schedule, LR_SCHEDULES, f'{prefix}.lr_schedule')
  config_lib.check_positive(c.learning_rate, f'{prefix}.learning_rate')
  config_lib.check_positive(c.warmup_steps, f'{prefix}.warmup_steps', allow_zero=True)
  config_lib.check_positive(c.grad_clip_norm, f'{prefix}.grad_clip_norm', allow_zero=True)
  config_lib.check_range(c.b1, 0.0, 1.0, f'{prefix}.b1')
  config_lib.check_range(c.b2, 0.0, 1.0, f'{prefix}.b2')
  if c.weight_decay and c.name != 'adamw':
    raise ConfigError(f"{prefix}.weight_decay={c.weight_decay} needs {prefix}.name='adamw'.")


def learning_rate_schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = optax.linear_schedule(0.0, c.learning_rate, max(c.warmup_steps, 1))
  if c.lr_schedule == 'constant':
    after = optax.constant_schedule(c.learning_rate)
  else:
    after = optax.cosine_decay_schedule(c.learning_rate, max(total_steps - c.warmup_steps, 1))
  return optax.join_schedules([warmup, after], [c.warmup_steps])


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  lr = learning_rate_schedule(c, total_steps)
  if c.name == 'adam':
    opt = optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps)
  else:
    opt = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
  if c.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), opt)
  return opt


def ema_update(ema_params, params, decay):
  """ema <- decay * ema + (1 - decay) * params, in the params' dtype."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)


def ema_decay(step, decay: float, warmup: bool = True):
  """EMA decay, ramped up as min(decay, (1 + step) / (10 + step)) early in training.

  The ramp keeps a fresh run's EMA from being dominated by the random init.
  """
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_step(step, ema_params, params, every: int, decay: float, warmup: bool = True):
  """The EMA after optimiser step `step` (0-based): updated every `every` steps."""
  new = ema_update(ema_params, params, ema_decay(step // every, decay, warmup))
  do_ema = (step + 1) % every == 0
  return jax.tree.map(lambda n, o: jnp.where(do_ema, n, o), new, ema_params)
