"""StyleGAN2's training step: the lazy-regularised G and D phases, G_ema, ADA.

One training step (one "batch" in stylegan2-ada-pytorch) runs the phases
  Gmain -> Greg (every g_reg_interval) -> Dmain -> Dreg (every d_reg_interval)
and then the G_ema update. Each phase is its own jitted function on the whole
TrainState, which it donates: the phase's output state reuses the input's
buffers, so a step holds one state, not two. The regularisation phases are
separate Adam steps with the loss weighted by the interval, and, as in the
reference, both networks' Adam uses lr * c and betas ** c, c = interval /
(interval + 1), to make up for the extra steps. Every random draw comes from
fold_in(rng, step), and the data batch from (seed, step), so a resumed run
repeats an uninterrupted one exactly.

`Steps` is the step object common.loop.run compiles and calls; `get_steps`
caches one per (config, mesh), so a resume in-process skips compiling.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from common import imageio, mesh as mesh_lib
from common import optim as optim_lib
from common import params as params_lib
from stylegan import augment as augment_lib
from stylegan import loss as loss_lib
from stylegan import networks
from stylegan.state import RNG_IMPL, TrainState, build_models, ema_beta, optimizers
from stylegan.state import state_shardings


class Steps:
  """The jitted phases for one config and mesh (cached: see `get_steps`)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
    self.config = config
    self.G, self.D = build_models(config)
    self.rules = params_lib.Rules(config.get('params'))  # Once per run (Steps is cached).
    self.g_tx, self.d_tx = optimizers(config, self.rules)
    self.policy = augment_lib.parse_policy(config.augment.policy)
    self.batch_size = config.train.batch_size
    self._data = mesh_lib.data_sharding(mesh)
    repl = mesh_lib.replicated(mesh)
    state = state_shardings(config, mesh, self.rules)
    with_metrics = (state, repl)
    # Every phase donates the state (argument 0): XLA writes the new state into the old
    # one's buffers, so G, D, G_ema and both Adam states are held once, not twice.
    phase = functools.partial(jax.jit, donate_argnums=0)
    self.g_main = phase(self._g_main, in_shardings=(state,), out_shardings=with_metrics)
    self.g_reg = phase(self._g_reg, in_shardings=(state,), out_shardings=with_metrics)
    self.d_main = phase(self._d_main, in_shardings=(state, self._data),
                        out_shardings=with_metrics)
    self.d_reg = phase(self._d_reg, in_shardings=(state, self._data),
                       out_shardings=with_metrics)
    self.finish = phase(self._finish, in_shardings=(state,), out_shardings=state)
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
    return imageio.to_unit(reals)

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
    """All phases of step `step` (== state.step); returns (state, metrics).

    `state` is donated: its arrays are deleted; use the returned state."""
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

