"""Optimiser with warm-up, clipping and per-rule learning rates and decay; gradients of the
trainable subtree, accumulated over micro-batches; EMA of parameters (shared by trainers)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from common import config as config_lib
from common import params as params_lib
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


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int,
                   rules: params_lib.Rules | None = None) -> optax.GradientTransformation:
  """The optimiser of the trainable parameters (`rules.split(params)[0]`).

  `rules` (config.params) give learning-rate multipliers (optax.multi_transform) and
  AdamW's decay mask; clipping is by the global norm over every trainable parameter.
  """
  lr = learning_rate_schedule(c, total_steps)

  def make(multiplier: float, decay_mask):
    rate = lr if multiplier == 1.0 else (lambda step: multiplier * lr(step))
    if c.name == 'adam':
      return optax.adam(rate, b1=c.b1, b2=c.b2, eps=c.eps)
    return optax.adamw(rate, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                       mask=decay_mask)

  opt = (rules or params_lib.Rules()).optimizer(make)
  if c.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), opt)
  return opt


def value_and_grad(loss_fn: Callable, params, rules: params_lib.Rules, batch,
                   accum_steps: int = 1, rng: jax.Array | None = None):
  """((loss, aux), grads) of `loss_fn(params, batch) -> (loss, aux)` w.r.t. the trainable
  parameters only (frozen ones are constants: no weight gradients are computed for them).

  With accum_steps = k > 1 the batch (every leaf's leading dimension) is cut into k
  interleaved micro-batches, run one after another in a `lax.scan`, and loss, aux and
  gradients are averaged: the same update as the whole batch at once when the loss is a
  mean over examples whose randomness is drawn per example outside `loss_fn`, at 1/k of
  the activation memory.

  Dropout is the randomness drawn inside `loss_fn`. Given `rng`, `loss_fn(params, batch,
  rng)` gets it for its model's dropout (the same key for every micro-batch), and every
  nn.Dropout it applies draws example i's mask from fold_in(the layer's key, i), i the
  example's row in the whole (global) batch, whichever micro-batch it falls in
  (`layers.per_example_dropout`). So each example draws its own masks, and k micro-batches
  of B/k draw exactly the masks of one batch of B: the same update. Without `rng`, a mask
  is drawn per call for the inputs of that call: a micro-batch's masks are not its rows'
  masks in the whole batch, and a key closed over repeats the same masks in every
  micro-batch.
  """
  trainable, frozen = rules.split(params)
  if rng is None:
    objective = lambda p, b: loss_fn(rules.merge(p, frozen), b)
  else:
    batch = (batch, jnp.arange(jax.tree.leaves(batch)[0].shape[0], dtype=jnp.uint32))

    from common import layers  # pylint: disable=g-import-not-at-top (flax: configs import optim)

    def objective(p, b):
      examples, rows = b
      with layers.per_example_dropout(rows):
        return loss_fn(rules.merge(p, frozen), examples, rng)

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  if accum_steps == 1:
    return grad_fn(trainable, batch)
  k = accum_steps
  # [B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, ...: each device keeps its
  # own rows (the batch is split in contiguous blocks), so no data moves between devices.
  # The row numbers (with `rng`) are split with their rows.
  micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1),
                       batch)
  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(grad_fn, trainable, first))

  def body(total, b):
    return jax.tree.map(jnp.add, total, grad_fn(trainable, b)), None

  total, _ = jax.lax.scan(body, zeros, micro)
  return jax.tree.map(lambda x: x / k, total)


def apply_gradients(tx: optax.GradientTransformation, grads, opt_state, params,
                    rules: params_lib.Rules):
  """(params, opt_state) after one optimiser step on the trainable subtree; frozen
  parameters come back untouched (the same arrays)."""
  trainable, frozen = rules.split(params)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  return rules.merge(optax.apply_updates(trainable, updates), frozen), opt_state


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
