"""StyleGAN2's train state: G, D, G_ema, w_avg, pl_mean, both optimisers' states, ADA's p.

Also what builds it: the two networks from config.model, the two Adam optimisers
(config.optim for G, config.disc_optim for D; lazy regularisation's lr/betas
correction), `create_state` (pure: what common's driver runs under eval_shape and
jit), `init_state` (the same, computed in its shardings on a mesh) and the
per-step EMA decay of G_ema.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from common import mesh as mesh_lib
from common import optim as optim_lib
from common import params as params_lib
from stylegan import networks


# RngBitGenerator-based keys: random bits compile far faster on CPU than
# threefry's unrolled hash (splits and fold_ins still use threefry). The state
# stores the raw key data (uint32) so Orbax can save it.
RNG_IMPL = 'rbg'


def make_key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl=RNG_IMPL)


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array          # Completed training steps.
  g_params: Any
  d_params: Any
  g_ema_params: Any        # Exponential moving average of G: what sampling uses.
  w_avg: jax.Array         # Moving average of w (truncation centre), [w_dim].
  pl_mean: jax.Array       # Running mean of path lengths.
  g_opt_state: Any
  d_opt_state: Any
  rng: jax.Array           # Base key data (uint32); step keys are fold_in(rng, step).
  ada_p: jax.Array         # Augmentation probability.
  ada_acc: jax.Array       # Sum of E[sign(D(reals))] since the last p update.


def build_models(config: ml_collections.ConfigDict):
  m = config.model
  g = networks.Generator(
      resolution=m.resolution, z_dim=m.z_dim, w_dim=m.w_dim,
      mapping_layers=m.mapping_layers, mapping_lr_multiplier=m.mapping_lr_multiplier,
      channel_base=m.channel_base, channel_max=m.channel_max)
  d = networks.Discriminator(
      resolution=m.resolution, channel_base=m.channel_base, channel_max=m.channel_max,
      mbstd_group_size=m.mbstd_group_size)
  return g, d


def make_optimizer(c: ml_collections.ConfigDict, reg_interval: int | None,
                   rules: params_lib.Rules, total_steps: int) -> optax.GradientTransformation:
  """Adam from an optim section (reference: lr 0.0025, betas (0, 0.99), eps 1e-8); lazy
  regularisation every k steps rescales lr and betas by c = k/(k+1), as the reference."""
  ratio = reg_interval / (reg_interval + 1) if reg_interval else 1.0
  c = c.copy_and_resolve_references()
  c.learning_rate, c.b1, c.b2 = c.learning_rate * ratio, c.b1**ratio, c.b2**ratio
  return optim_lib.make_optimizer(c, total_steps, rules)


def optimizers(config: ml_collections.ConfigDict, rules: params_lib.Rules | None = None):
  l, n = config.loss, config.train.num_steps
  rules = rules or params_lib.Rules(config.get('params'))
  g_tx = make_optimizer(config.optim, l.g_reg_interval if l.pl_weight > 0 else None, rules, n)
  d_tx = make_optimizer(config.disc_optim, l.d_reg_interval if l.r1_gamma > 0 else None, rules, n)
  return g_tx, d_tx


def create_state(config: ml_collections.ConfigDict, key: jax.Array,
                 rules: params_lib.Rules | None = None) -> TrainState:
  g, d = build_models(config)
  rules = rules or params_lib.Rules(config.get('params'))
  g_tx, d_tx = optimizers(config, rules)
  trainable = lambda params: rules.split(params)[0]
  k_g, k_d, k_noise, rng = jax.random.split(key, 4)
  z = jnp.zeros((1, config.model.z_dim))
  g_params = g.init({'params': k_g, 'noise': k_noise}, z)['params']
  img = jnp.zeros((1, config.model.resolution, config.model.resolution, 3))
  d_params = d.init(k_d, img)['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32), g_params=g_params, d_params=d_params,
      g_ema_params=g_params, w_avg=jnp.zeros((config.model.w_dim,)),
      pl_mean=jnp.zeros(()), g_opt_state=g_tx.init(trainable(g_params)),
      d_opt_state=d_tx.init(trainable(d_params)), rng=jax.random.key_data(rng),
      ada_p=jnp.asarray(config.augment.p, jnp.float32), ada_acc=jnp.zeros(()))


def state_shardings(config: ml_collections.ConfigDict, mesh: Mesh,
                    rules: params_lib.Rules | None = None):
  """Where each array of the state lives on `mesh` (common.mesh.state_shardings on its
  shapes, config.params' sharding rules): what the phases, creation and restore use."""
  rules = rules or params_lib.Rules(config.get('params'))
  shapes = jax.eval_shape(lambda: create_state(config, make_key(0), rules))
  return mesh_lib.state_shardings(shapes, mesh, rules)


def init_state(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> TrainState:
  """create_state from config.seed, computed in its shardings on the mesh (config.mesh's
  when not given): the state a fresh run starts from."""
  mesh = mesh or mesh_lib.make_mesh(config.get('mesh'))
  return jax.jit(lambda: create_state(config, make_key(config.seed)),
                 out_shardings=state_shardings(config, mesh))()


def ema_beta(step: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """Per-step EMA decay for a half-life of ema_kimg thousand images (with ramp-up)."""
  t = config.train
  batch = t.batch_size
  ema_nimg = jnp.asarray(t.ema_kimg * 1000.0)
  if t.ema_rampup:  # Images seen before this step, as in the reference (G_ema = G at step 0).
    ema_nimg = jnp.minimum(ema_nimg, step * batch * t.ema_rampup)
  return 0.5 ** (batch / jnp.maximum(ema_nimg, 1e-8))
