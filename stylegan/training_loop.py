"""StyleGAN2 training: phases, lazy regularisation, EMA, ADA; the shared plumbing for the rest.

One training step (one "batch" in stylegan2-ada-pytorch) runs the phases
  Gmain -> Greg (every g_reg_interval) -> Dmain -> Dreg (every d_reg_interval)
and then the G_ema update. Each phase is its own jitted function on the whole
TrainState; the regularisation phases are separate Adam steps with the loss
weighted by the interval, and, as in the reference, both networks' Adam uses
lr * c and betas ** c, c = interval / (interval + 1), to make up for the extra
steps. Every random draw comes from fold_in(rng, step), and the data batch
from (seed, step), so a resumed run repeats an uninterrupted one exactly.

The driver is the shared one (common.experiment): `Experiment` supplies the
state, the phases as one step object and the grid hook; the loop, resume,
SIGTERM save, NaN stop, metric averaging, sharding (config.mesh, config.params)
and checkpoints are common's.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from common import data as data_lib
from common import errors
from common import experiment
from common import imageio
from common import loop
from common import logs
from common import mesh as mesh_lib
from common import optim as optim_lib
from common import params as params_lib
from metrics import diversity
from stylegan import augment as augment_lib
from stylegan.configs import base as config_lib
from stylegan import loss as loss_lib
from stylegan import networks


# RngBitGenerator-based keys: random bits compile far faster on CPU than
# threefry's unrolled hash (splits and fold_ins still use threefry). The state
# stores the raw key data (uint32) so Orbax can save it.
RNG_IMPL = 'rbg'


def _key(seed: int) -> jax.Array:
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


def optimizers(config: ml_collections.ConfigDict):
  l, rules, n = config.loss, params_lib.Rules(config.get('params')), config.train.num_steps
  g_tx = make_optimizer(config.optim, l.g_reg_interval if l.pl_weight > 0 else None, rules, n)
  d_tx = make_optimizer(config.disc_optim, l.d_reg_interval if l.r1_gamma > 0 else None, rules, n)
  return g_tx, d_tx


def create_state(config: ml_collections.ConfigDict, key: jax.Array) -> TrainState:
  g, d = build_models(config)
  g_tx, d_tx = optimizers(config)
  trainable = lambda params: params_lib.Rules(config.get('params')).split(params)[0]
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


def init_state(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> TrainState:
  """create_state from config.seed, computed in its shardings on the mesh."""
  exp = Experiment(config)
  exp.mesh = mesh or mesh_lib.make_mesh(config.get('mesh'))
  return exp.create_state()


def ema_beta(step: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """Per-step EMA decay for a half-life of ema_kimg thousand images (with ramp-up)."""
  t = config.train
  batch = t.batch_size
  ema_nimg = jnp.asarray(t.ema_kimg * 1000.0)
  if t.ema_rampup:  # Images seen before this step, as in the reference (G_ema = G at step 0).
    ema_nimg = jnp.minimum(ema_nimg, step * batch * t.ema_rampup)
  return 0.5 ** (batch / jnp.maximum(ema_nimg, 1e-8))


class Steps:
  """The jitted phases for one config and mesh (cached: see `get_steps`)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
    self.config = config
    self.G, self.D = build_models(config)
    self.g_tx, self.d_tx = optimizers(config)
    self.rules = params_lib.Rules(config.get('params'))
    self.policy = augment_lib.parse_policy(config.augment.policy)
    self.batch_size = config.train.batch_size
    self._data = mesh_lib.data_sharding(mesh)
    repl = mesh_lib.replicated(mesh)
    state = mesh_lib.state_shardings(jax.eval_shape(lambda: create_state(config, _key(0))),
                                     mesh, self.rules)
    with_metrics = (state, repl)
    self.g_main = jax.jit(self._g_main, in_shardings=(state,), out_shardings=with_metrics)
    self.g_reg = jax.jit(self._g_reg, in_shardings=(state,), out_shardings=with_metrics)
    self.d_main = jax.jit(self._d_main, in_shardings=(state, self._data),
                          out_shardings=with_metrics)
    self.d_reg = jax.jit(self._d_reg, in_shardings=(state, self._data),
                         out_shardings=with_metrics)
    self.finish = jax.jit(self._finish, in_shardings=(state,), out_shardings=state)
    self.compiled = False

  # -- pieces ----------------------------------------------------------------

  def _keys(self, state: TrainState, phase: int, n: int):
    base = jax.random.wrap_key_data(state.rng, impl=RNG_IMPL)
    return jax.random.split(jax.random.fold_in(jax.random.fold_in(base, state.step), phase), n)

  def _latents(self, key, n):
    # Generated inside jit: constrain to the data axis so each device runs G on its own rows.
    z = jax.random.normal(key, (n, self.config.model.z_dim))
    return jax.lax.with_sharding_constraint(z, self._data)

  def _run_mapping(self, g_params, key, n):
    """ws with style mixing, plus the unmixed ws (for the w_avg update)."""
    k_z, k_z2, k_mix = jax.random.split(key, 3)
    ws = self.G.apply({'params': g_params}, self._latents(k_z, n), method='mapping')
    prob = self.config.loss.style_mixing_prob
    if prob <= 0:
      return ws, ws
    ws2 = self.G.apply({'params': g_params}, self._latents(k_z2, n), method='mapping')
    return loss_lib.style_mix(k_mix, ws, ws2, prob), ws

  def _synthesis(self, g_params, ws, key):
    return self.G.apply({'params': g_params}, ws, method='synthesis', rngs={'noise': key})

  def _run_d(self, d_params, img, key, p):
    if self.policy:
      img = augment_lib.augment(key, img, self.policy, p)
    return self.D.apply({'params': d_params}, img)

  def _grad(self, loss_fn, params):
    """value_and_grad of loss_fn(params) -> (loss, aux) w.r.t. the trainable parameters."""
    return optim_lib.value_and_grad(lambda p, _: loss_fn(p), params, self.rules, None)

  def _update(self, tx, grads, opt_state, params):
    return optim_lib.apply_gradients(tx, grads, opt_state, params, self.rules)

  @staticmethod
  def _to_float(reals):
    return reals.astype(jnp.float32) / 127.5 - 1.0

  # -- phases ----------------------------------------------------------------

  def _g_main(self, state: TrainState):
    k_map, k_noise, k_aug = self._keys(state, 0, 3)

    def loss_fn(g_params):
      ws, ws_unmixed = self._run_mapping(g_params, k_map, self.batch_size)
      img = self._synthesis(g_params, ws, k_noise)
      logits = self._run_d(state.d_params, img, k_aug, state.ada_p)
      return loss_lib.g_nonsaturating_loss(logits), (ws_unmixed, logits)

    (loss, (ws, logits)), grads = self._grad(loss_fn, state.g_params)
    g_params, opt_state = self._update(self.g_tx, grads, state.g_opt_state, state.g_params)
    w_avg = networks.update_w_avg(state.w_avg, jax.lax.stop_gradient(ws),
                                  self.config.model.w_avg_beta)
    state = state.replace(g_params=g_params, g_opt_state=opt_state, w_avg=w_avg)
    return state, {'loss/G': loss, 'D/fake_logits_G': jnp.mean(logits)}

  def _g_reg(self, state: TrainState):
    l = self.config.loss
    k_map, k_noise, k_pl = self._keys(state, 1, 3)
    n = self.batch_size // l.pl_batch_shrink

    def loss_fn(g_params):
      ws, _ = self._run_mapping(g_params, k_map, n)
      lengths = loss_lib.path_lengths(lambda w: self._synthesis(g_params, w, k_noise), ws, k_pl)
      penalty, pl_mean = loss_lib.path_length_penalty(lengths, state.pl_mean, l.pl_decay)
      return penalty * l.pl_weight * l.g_reg_interval, (penalty, pl_mean)

    (_, (penalty, pl_mean)), grads = self._grad(loss_fn, state.g_params)
    g_params, opt_state = self._update(self.g_tx, grads, state.g_opt_state, state.g_params)
    state = state.replace(g_params=g_params, g_opt_state=opt_state, pl_mean=pl_mean)
    return state, {'loss/pl_penalty': penalty, 'pl_mean': pl_mean}

  def _d_main(self, state: TrainState, reals):
    a = self.config.augment
    k_map, k_noise, k_aug = self._keys(state, 2, 3)
    ws, _ = self._run_mapping(state.g_params, k_map, self.batch_size)
    fakes = jax.lax.stop_gradient(self._synthesis(state.g_params, ws, k_noise))
    # One D pass over [fakes; reals]: half the graph to compile. Minibatch-stddev
    # groups are consecutive samples, so no group mixes fakes and reals.
    both = jnp.concatenate([fakes, self._to_float(reals)])

    def loss_fn(d_params):
      fake_logits, real_logits = jnp.split(self._run_d(d_params, both, k_aug, state.ada_p), 2)
      loss_fake, loss_real = loss_lib.d_logistic_loss(real_logits, fake_logits)
      return loss_fake + loss_real, (loss_fake, loss_real, real_logits, fake_logits)

    (loss, (loss_fake, loss_real, real_logits, fake_logits)), grads = self._grad(
        loss_fn, state.d_params)
    d_params, opt_state = self._update(self.d_tx, grads, state.d_opt_state, state.d_params)
    rt = jnp.mean(jnp.sign(real_logits))
    ada_p, ada_acc = state.ada_p, state.ada_acc
    if self.policy and a.ada_target > 0:  # ADA: adjust p every ada_interval steps.
      ada_acc = ada_acc + rt
      update = (state.step + 1) % a.ada_interval == 0
      new_p = augment_lib.ada_adjust(ada_p, ada_acc / a.ada_interval, a.ada_target,
                                     self.batch_size, a.ada_interval, a.ada_kimg)
      ada_p = jnp.where(update, new_p, ada_p)
      ada_acc = jnp.where(update, 0.0, ada_acc)
    state = state.replace(d_params=d_params, d_opt_state=opt_state, ada_p=ada_p, ada_acc=ada_acc)
    return state, {
        'loss/D': loss, 'loss/D_fake': loss_fake, 'loss/D_real': loss_real,
        'D/real_logits': jnp.mean(real_logits), 'D/fake_logits': jnp.mean(fake_logits),
        'augment/rt': rt, 'augment/p': state.ada_p}

  def _d_reg(self, state: TrainState, reals):
    l = self.config.loss
    (k_aug,) = self._keys(state, 3, 1)
    reals = self._to_float(reals)

    def loss_fn(d_params):
      # Gradient w.r.t. the images before augmentation, as in the reference.
      r1, _ = loss_lib.r1_penalty(lambda x: self._run_d(d_params, x, k_aug, state.ada_p), reals)
      penalty = jnp.mean(r1)
      return penalty * (l.r1_gamma / 2) * l.d_reg_interval, penalty

    (_, penalty), grads = self._grad(loss_fn, state.d_params)
    d_params, opt_state = self._update(self.d_tx, grads, state.d_opt_state, state.d_params)
    state = state.replace(d_params=d_params, d_opt_state=opt_state)
    return state, {'loss/r1_penalty': penalty}

  def _finish(self, state: TrainState):
    beta = ema_beta(state.step, self.config)
    ema = optim_lib.ema_update(state.g_ema_params, state.g_params, beta)
    return state.replace(g_ema_params=ema, step=state.step + 1)

  def compile(self, state: TrainState, reals):
    """Compiles every phase ahead of time (so the first steps' rate is not compile time);
    returns `train_step`, what common.loop.run calls."""
    if self.compiled:  # Steps are cached per (config, mesh): a resume in-process reuses them.
      return self.train_step
    self.compiled = True
    l = self.config.loss
    self.g_main = self.g_main.lower(state).compile()
    if l.pl_weight > 0:
      self.g_reg = self.g_reg.lower(state).compile()
    self.d_main = self.d_main.lower(state, reals).compile()
    if l.r1_gamma > 0:
      self.d_reg = self.d_reg.lower(state, reals).compile()
    self.finish = self.finish.lower(state).compile()
    return self.train_step

  # -- one whole step --------------------------------------------------------

  def train_step(self, state: TrainState, reals, step: int):
    """All phases of step `step` (== state.step); returns (state, metrics)."""
    l = self.config.loss
    metrics = {}
    state, m = self.g_main(state)
    metrics.update(m)
    if l.pl_weight > 0 and step % l.g_reg_interval == 0:
      state, m = self.g_reg(state)
      metrics.update(m)
    state, m = self.d_main(state, reals)
    metrics.update(m)
    if l.r1_gamma > 0 and step % l.d_reg_interval == 0:
      state, m = self.d_reg(state, reals)
      metrics.update(m)
    return self.finish(state), metrics


def _compute_key(config: ml_collections.ConfigDict) -> str:
  """The config parts the compiled steps depend on (not data, logging or step counts)."""
  t = config.train
  return json.dumps({
      'model': config.model.to_dict(), 'loss': config.loss.to_dict(),
      'optim': config.optim.to_dict(), 'disc_optim': config.disc_optim.to_dict(),
      'augment': config.augment.to_dict(), 'params': config.params.to_dict(),
      'train': {'batch_size': t.batch_size, 'ema_kimg': t.ema_kimg,
                # The optimisers' schedules depend on the run's length only when they decay.
                'num_steps': t.num_steps if 'cosine' in (config.optim.lr_schedule,
                                                         config.disc_optim.lr_schedule) else 0,
                'ema_rampup': t.ema_rampup}}, sort_keys=True, default=list)


@functools.lru_cache(maxsize=4)
def _cached_steps(key: str, mesh: Mesh) -> Steps:
  c = ml_collections.ConfigDict(json.loads(key))
  return Steps(c, mesh)


def get_steps(config: ml_collections.ConfigDict, mesh: Mesh) -> Steps:
  """Steps for (config, mesh), reused across calls so a resume in-process skips compiling."""
  return _cached_steps(_compute_key(config), mesh)


def generate(g_params, w_avg, config: ml_collections.ConfigDict, z: np.ndarray,
             psi: float = 1.0, cutoff: int = 0, noise_mode: str = 'const',
             noise_seed: int = 0, batch_size: int = 64) -> np.ndarray:
  """z [N, z_dim] -> uint8 images [N, R, R, 3] with truncation (psi, cutoff)."""
  fn = _generate_fn(json.dumps(config.model.to_dict(), sort_keys=True), noise_mode, cutoff or None)
  out = []
  for i in range(0, len(z), batch_size):
    key = jax.random.fold_in(_key(noise_seed), i)
    img = fn(g_params, w_avg, jnp.asarray(z[i:i + batch_size]), jnp.float32(psi), key)
    out.append(imageio.to_uint8(mesh_lib.gather(img)))
  return np.concatenate(out)


@functools.lru_cache(maxsize=8)
def _generate_fn(model_json: str, noise_mode: str, cutoff: int | None):
  g, _ = build_models(ml_collections.ConfigDict({'model': json.loads(model_json)}))

  @jax.jit
  def fn(g_params, w_avg, z, psi, key):
    return g.apply({'params': g_params}, z, w_avg, psi, cutoff, noise_mode, rngs={'noise': key})
  return fn


def fixed_latents(config: ml_collections.ConfigDict, n: int) -> np.ndarray:
  """The same z for every grid of a run (and of a resumed run)."""
  rng = np.random.default_rng([config.seed, 2024])
  return rng.standard_normal((n, config.model.z_dim)).astype(np.float32)


def _grid_hook(writer, workdir: Path, config, reals: np.ndarray):
  """fn(step, state): G_ema's grid from fixed latents, and its diversity against the data.

  The grid goes to TensorBoard and WORKDIR/samples_during_training/<step>.png; the
  diversity (metrics.diversity: mean pairwise distance of 64 samples over that of 64
  reals) is logged, so a collapse (every z giving one image, ratio near 0) shows early.
  """
  n = max(config.train.num_grid_samples, 64)
  z = fixed_latents(config, n)
  real_sample = reals[np.random.default_rng(config.seed).permutation(len(reals))[:n]]

  def hook(step: int, state: TrainState) -> None:
    images = generate(state.g_ema_params, state.w_avg, config, z,
                      batch_size=config.sample.batch_size)
    grid = imageio.make_grid(images[:config.train.num_grid_samples])
    logs.write_image_grid(writer, step, 'samples/G_ema', grid)
    ratio = diversity.diversity_ratio(images, real_sample)
    writer.write_scalars(step, {'diversity/G_ema': ratio})
    if jax.process_index() == 0:
      logging.info('step %d: G_ema diversity %.3f of the data\'s (1 = as varied as the data).',
                   step, ratio)
      imageio.save_image(grid, workdir / 'samples_during_training' / f'{step:08d}.png')
  return hook


class Experiment(experiment.Experiment):
  """StyleGAN2 on the shared driver: G, D, G_ema and their optimisers in one state; each
  step runs the phases (common.loop.run calls the `Steps` object); G_ema grids and
  diversity every train.sample_every steps."""
  name = 'G and D'
  run_keys = config_lib.RUN_KEYS

  def validate(self):
    config_lib.validate(self.config)

  def setup(self):
    self.images = data_lib.load_dataset(self.config.data)
    if self.images.shape[1:3] != (self.config.model.resolution,) * 2:
      raise errors.DataError(f'Data images are {self.images.shape[1:3]} but model.resolution='
                             f'{self.config.model.resolution}.')

  def init_state(self):
    return create_state(self.config, _key(self.config.seed))

  def param_trees(self, state):
    return {'G': state.g_params, 'D': state.d_params}

  def make_step(self, shardings):
    return get_steps(self.config, self.mesh)

  def batches(self, start):
    t = self.config.train
    return data_lib.BatchIterator(self.images, t.batch_size, self.config.seed, step=start)

  def scalars(self, step):
    return {**super().scalars(step), 'kimg': step * self.config.train.batch_size / 1000.0}

  def hooks(self, writer):
    return [loop.Hook(self.config.train.sample_every,
                      _grid_hook(writer, self.workdir, self.config, self.images),
                      'sampling the G_ema grid')]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
  """Trains (resuming from workdir's last checkpoint) until train.num_steps."""
  return experiment.train_and_evaluate(Experiment(config), workdir)
