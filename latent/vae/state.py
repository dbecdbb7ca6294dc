"""Stage 1's train state: the autoencoder, its patch discriminator and their optimisers.

What the state is matters twice: for training (`latent.vae.train.Experiment`) and for
restoring a finished run read-only (`latent.vae.codec.load_vae`), which needs the
layout but none of the losses.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from common import experiment, mesh as mesh_lib, optim
from common import params as params_lib
from latent.configs import vae_base
from latent.vae import autoencoder, loss as vae_loss

@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  disc_params: Any
  opt_state: Any
  disc_opt_state: Any
  rng: jax.Array  # Base key: never advanced, folded with the step.
  scale_factor: jnp.ndarray  # 1 / std of the latents; 0 until computed at the last step.


def build_model(config: ml_collections.ConfigDict) -> autoencoder.AutoencoderKL:
  v = config.vae
  return autoencoder.AutoencoderKL(
      block_out_channels=tuple(v.block_out_channels), layers_per_block=v.layers_per_block,
      latent_channels=v.latent_channels, norm_groups=v.norm_groups,
      dtype=jnp.bfloat16 if v.dtype == 'bfloat16' else jnp.float32)


def build_discriminator(config: ml_collections.ConfigDict) -> vae_loss.NLayerDiscriminator:
  l = config.loss
  return vae_loss.NLayerDiscriminator(
      l.disc_channels, l.disc_layers, l.disc_norm,
      dtype=jnp.bfloat16 if config.vae.dtype == 'bfloat16' else jnp.float32)


def make_optimizers(config, rules: params_lib.Rules | None = None):
  n, rules = config.train.num_steps, rules or params_lib.Rules(config.get('params'))
  return (optim.make_optimizer(config.optim, n, rules),
          optim.make_optimizer(config.disc_optim, n, rules))


def init_state(config, model, disc, tx, disc_tx, rules: params_lib.Rules | None = None) -> TrainState:
  rules = rules or params_lib.Rules(config.get('params'))
  rng = jax.random.PRNGKey(config.seed)
  ae_rng, disc_rng, state_rng = jax.random.split(rng, 3)
  size = config.data.image_size
  # The state is initialised replicated, so threefry's partitionable mode buys nothing here,
  # while XLA compiles its 4-D random kernels (one per conv shape) several times slower.
  with jax.threefry_partitionable(False):
    params = autoencoder.init_params(model, ae_rng, size)
    disc_params = disc.init(disc_rng, jnp.zeros((1, size, size, 3)))['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, disc_params=disc_params,
                    opt_state=tx.init(rules.split(params)[0]),
                    disc_opt_state=disc_tx.init(rules.split(disc_params)[0]),
                    rng=state_rng, scale_factor=jnp.zeros((), jnp.float32))


def create_train_state(config, model, disc, tx, disc_tx, mesh,
                       rules: params_lib.Rules | None = None) -> TrainState:
  """Initialises the state directly in its shardings on the mesh (no host round trip)."""
  rules = rules or params_lib.Rules(config.get('params'))
  init = functools.partial(init_state, config, model, disc, tx, disc_tx, rules)
  shardings = mesh_lib.state_shardings(jax.eval_shape(init), mesh, rules)
  return jax.jit(init, out_shardings=shardings)()


class StateExperiment(experiment.Experiment):
  """Stage 1's networks and state for common's driver; `train.Experiment` adds the rest."""
  name = 'autoencoder'
  run_keys = vae_base.RUN_KEYS

  @functools.cached_property
  def nets(self):
    """(autoencoder, discriminator, its optimiser, the discriminator's)."""
    return (build_model(self.config), build_discriminator(self.config),
            *make_optimizers(self.config, self.rules))

  def init_state(self):
    return init_state(self.config, *self.nets, self.rules)

  def param_trees(self, state):
    return {'autoencoder': state.params, 'discriminator': state.disc_params}
