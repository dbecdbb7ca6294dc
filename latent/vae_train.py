"""Stage 1 of latent diffusion: training the KL autoencoder, `train_and_evaluate(config, workdir)`.

One jitted step updates the autoencoder and, from step `loss.disc_start` on,
the patch discriminator. Each step's randomness is `fold_in(rng, step)` and
its batch a function of (seed, step), so a resumed run continues bit for bit.
The last `train.num_eval_images` images are held out for the reconstruction
PSNR and grids. At the end the latent scale factor is computed and stored in
the final checkpoint's TrainState; stage 2 reads it with `load_vae`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from common import data, errors, experiment, imageio, logs, loop, mesh as mesh_lib
from common import optim
from common import params as params_lib
from latent import autoencoder, lpips, vae_loss
from latent.configs import vae_base

TRAIN_COMMAND = 'python -m latent.main --config=latent/configs/vae_anime.py --workdir=...'


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


def make_optimizers(config):
  n, rules = config.train.num_steps, params_lib.Rules(config.get('params'))
  return (optim.make_optimizer(config.optim, n, rules),
          optim.make_optimizer(config.disc_optim, n, rules))


def init_state(config, model, disc, tx, disc_tx) -> TrainState:
  rng = jax.random.PRNGKey(config.seed)
  ae_rng, disc_rng, state_rng = jax.random.split(rng, 3)
  size = config.data.image_size
  # The state is initialised replicated, so threefry's partitionable mode buys nothing here,
  # while XLA compiles its 4-D random kernels (one per conv shape) several times slower.
  with jax.threefry_partitionable(False):
    params = autoencoder.init_params(model, ae_rng, size)
    disc_params = disc.init(disc_rng, jnp.zeros((1, size, size, 3)))['params']
  rules = params_lib.Rules(config.get('params'))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, disc_params=disc_params,
                    opt_state=tx.init(rules.split(params)[0]),
                    disc_opt_state=disc_tx.init(rules.split(disc_params)[0]),
                    rng=state_rng, scale_factor=jnp.zeros((), jnp.float32))


def create_train_state(config, model, disc, tx, disc_tx, mesh) -> TrainState:
  """Initialises the state directly in its shardings on the mesh (no host round trip)."""
  init = functools.partial(init_state, config, model, disc, tx, disc_tx)
  shardings = mesh_lib.state_shardings(jax.eval_shape(init), mesh,
                                       params_lib.Rules(config.get('params')))
  return jax.jit(init, out_shardings=shardings)()


def train_step(state: TrainState, batch: jnp.ndarray, lpips_params=None, *, config, model, disc,
               tx, disc_tx):
  """One step on a uint8 [B, H, W, 3] batch: autoencoder always, discriminator after disc_start.

  The autoencoder's forward pass is linearised once (jax.vjp). The losses are
  functions of its outputs (reconstruction, mean, logvar), so their gradients
  with respect to those outputs are cheap; LDM's adaptive weight pushes the
  reconstruction and GAN output-gradients through the decoder's conv_out
  alone, and one backward pass takes the weighted sum to the parameters.
  With `lpips_params` (frozen LPIPS-VGG weights, loss.lpips_weight > 0) the
  reconstruction loss includes LPIPS, so its output-gradient, and with it the
  adaptive weight, does too, as in LDM.
  """
  l = config.loss
  rules = params_lib.Rules(config.get('params'))
  rng = jax.random.fold_in(state.rng, state.step)
  x = batch.astype(jnp.float32) / 127.5 - 1.0

  def forward(params):
    (recon, mean, logvar), inter = model.apply({'params': params}, x, rng,
                                               mutable=['intermediates'])
    return (recon, mean, logvar), inter['intermediates']['decoder']['conv_out_input'][0]

  (recon, mean, logvar), backward, conv_out_input = jax.vjp(forward, state.params, has_aux=True)
  lpips_metrics = {}
  if lpips_params is None:
    rec_loss, grad_rec = jax.value_and_grad(
        lambda r: vae_loss.reconstruction_loss(x, r, l.rec_loss))(recon)
  else:
    # Only recon is differentiated: the LPIPS weights stay frozen (and out of the train state).
    distance = functools.partial(lpips.lpips_distance, lpips_params, dtype=model.dtype)
    (rec_loss, lpips_value), grad_rec = jax.value_and_grad(
        lambda r: vae_loss.lpips_reconstruction_loss(x, r, l.rec_loss, l.lpips_weight, distance),
        has_aux=True)(recon)
    lpips_metrics = dict(lpips=lpips_value)
  kl, (grad_mean, grad_logvar) = jax.value_and_grad(vae_loss.kl_loss, argnums=(0, 1))(mean, logvar)

  def gan_on(_):
    disc_apply = lambda p, images: disc.apply({'params': p}, images)
    g_loss, grad_gan = jax.value_and_grad(
        lambda r: vae_loss.hinge_g_loss(disc_apply(state.disc_params, r)))(recon)
    conv_out = state.params['decoder']['conv_out']
    last = lambda g: vae_loss.last_layer_grad(model, conv_out, conv_out_input, g)
    weight = vae_loss.adaptive_weight(last(grad_rec), last(grad_gan), l.disc_weight)

    # Real and fake in one call: the discriminator normalises per example, so this is the
    # same as two calls. Simultaneous update: D sees this step's (pre-update) reconstructions.
    fake = jax.lax.stop_gradient(recon)

    def d_loss_fn(p):
      logits = disc_apply(p, jnp.concatenate([x, fake]))
      real, fake_logits = jnp.split(logits, 2)
      return vae_loss.hinge_d_loss(real, fake_logits), (jnp.mean(real), jnp.mean(fake_logits))

    (d_loss, (logits_real, logits_fake)), d_grads = optim.value_and_grad(
        lambda p, _: d_loss_fn(p), state.disc_params, rules, None)
    disc_params, disc_opt_state = optim.apply_gradients(disc_tx, d_grads, state.disc_opt_state,
                                                        state.disc_params, rules)
    metrics = dict(g_loss=g_loss, gan_weight=weight, disc_loss=d_loss, logits_real=logits_real,
                   logits_fake=logits_fake)
    return weight * grad_gan, disc_params, disc_opt_state, metrics

  def gan_off(_):
    zero = jnp.zeros((), jnp.float32)
    metrics = dict(g_loss=zero, gan_weight=zero, disc_loss=zero, logits_real=zero,
                   logits_fake=zero)
    return jnp.zeros_like(recon), state.disc_params, state.disc_opt_state, metrics

  # Before disc_start the discriminator is neither run nor updated (its Adam state included).
  grad_gan, disc_params, disc_opt_state, gan_metrics = jax.lax.cond(
      state.step >= l.disc_start, gan_on, gan_off, None)

  grads, = backward((grad_rec + grad_gan, l.kl_weight * grad_mean, l.kl_weight * grad_logvar))
  grads = rules.split(grads)[0]  # Frozen parameters' gradients are dropped (and DCE'd).
  params, opt_state = optim.apply_gradients(tx, grads, state.opt_state, state.params, rules)

  loss = rec_loss + l.kl_weight * kl + gan_metrics['gan_weight'] * gan_metrics['g_loss']
  metrics = dict(loss=loss, rec_loss=rec_loss, kl=kl, grad_norm=optax.global_norm(grads),
                 l1=jnp.mean(jnp.abs(recon - x)), mse=jnp.mean(jnp.square(recon - x)),
                 posterior_std=jnp.mean(jnp.exp(0.5 * logvar)), **gan_metrics, **lpips_metrics)
  return state.replace(step=state.step + 1, params=params, disc_params=disc_params,
                       opt_state=opt_state, disc_opt_state=disc_opt_state), metrics


def make_train_step(config, model, disc, tx, disc_tx, mesh, lpips_params=None, shardings=None):
  """The jitted step(state, batch[, lpips_params]): the LPIPS weights (from load_lpips, placed
  on the mesh) are an argument, not ~59 MB of constants compiled into the program."""
  if shardings is None:
    init = functools.partial(init_state, config, model, disc, tx, disc_tx)
    shardings = mesh_lib.state_shardings(jax.eval_shape(init), mesh,
                                         params_lib.Rules(config.get('params')))
  step = functools.partial(train_step, config=config, model=model, disc=disc, tx=tx,
                           disc_tx=disc_tx)
  constants = () if lpips_params is None else (
      jax.tree.map(lambda x: x.sharding, lpips_params),)
  return loop.jit_step(step, mesh, shardings, constants)


def load_lpips(config):
  """The frozen LPIPS-VGG weights (numpy) when loss.lpips_weight > 0, else None."""
  l = config.loss
  return lpips.load_params(l.lpips_weights) if l.lpips_weight > 0 else None


# --- Encoding and decoding (what stage 2 uses) -----------------------------------------------

def encode_latents(model: autoencoder.AutoencoderKL, params, scale_factor, images_uint8,
                   rng: jax.Array | None = None) -> jnp.ndarray:
  """uint8 [B, H, W, 3] -> scale_factor * z, z the posterior mean (rng None) or a sample.

  Jittable. The scale factor was measured on posterior means (see
  `compute_scale_factor`); with kl_weight=1e-6 the posterior std is small
  next to the spread of the means, so samples have nearly the same scale.
  """
  x = jnp.asarray(images_uint8).astype(jnp.float32) / 127.5 - 1.0
  mean, logvar = model.apply({'params': params}, x, method=model.encode)
  z = autoencoder.mode(mean, logvar) if rng is None else autoencoder.sample(mean, logvar, rng)
  return scale_factor * z


def decode_latents(model: autoencoder.AutoencoderKL, params, scale_factor,
                   latents: jnp.ndarray) -> jnp.ndarray:
  """Scaled latents -> images in [-1, 1] (unclipped). Jittable."""
  return model.apply({'params': params}, latents / scale_factor, method=model.decode)


@functools.partial(jax.jit, static_argnums=0)
def _encode_batch(model, params, scale_factor, images, rng):
  return encode_latents(model, params, scale_factor, images, rng)


@functools.partial(jax.jit, static_argnums=0)
def _encode_mean_batch(model, params, scale_factor, images):
  return encode_latents(model, params, scale_factor, images)


@functools.partial(jax.jit, static_argnums=0)
def _decode_batch(model, params, scale_factor, latents):
  return decode_latents(model, params, scale_factor, latents)


def _batched(fn, array: np.ndarray, batch_size: int) -> np.ndarray:
  """fn over `array` in equal batches sharded over the local mesh (last one padded)."""
  mesh = mesh_lib.make_mesh()
  n_dev = mesh.devices.size
  batch = math.ceil(min(batch_size, len(array)) / n_dev) * n_dev
  out = []
  for i, start in enumerate(range(0, len(array), batch)):
    chunk = np.asarray(array[start:start + batch])
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
    y = fn(i, jax.device_put(padded, mesh_lib.data_sharding(mesh)))
    out.append(mesh_lib.gather(y)[:len(chunk)])
  return np.concatenate(out)


def encode_images(model: autoencoder.AutoencoderKL, params, scale_factor: float,
                  images_uint8: np.ndarray, batch_size: int, sample_posterior: bool = False,
                  rng: jax.Array | None = None) -> np.ndarray:
  """uint8 [N, H, W, 3] -> float32 latents [N, H/f, W/f, C] = scale_factor * z.

  z is the posterior mean by default (deterministic: a latent cache is
  reproducible); `sample_posterior=True` draws z ~ q(z|x) with `rng`, as SD's
  training scripts do.
  """
  scale = jnp.float32(scale_factor)
  if sample_posterior:
    if rng is None:
      raise ValueError('encode_images(sample_posterior=True) needs an rng.')
    fn = lambda i, x: _encode_batch(model, params, scale, x, jax.random.fold_in(rng, i))
  else:
    fn = lambda i, x: _encode_mean_batch(model, params, scale, x)
  return _batched(fn, images_uint8, batch_size)


def decode_images(model: autoencoder.AutoencoderKL, params, scale_factor: float,
                  latents: np.ndarray, batch_size: int) -> np.ndarray:
  """Scaled latents [N, h, w, C] -> uint8 images [N, h*f, w*f, 3]."""
  scale = jnp.float32(scale_factor)
  x = _batched(lambda i, z: _decode_batch(model, params, scale, z), latents, batch_size)
  return imageio.to_uint8(x)


def reconstruct(model, params, images_uint8: np.ndarray, batch_size: int) -> np.ndarray:
  """uint8 -> uint8 through the posterior mean."""
  latents = encode_images(model, params, 1.0, images_uint8, batch_size)
  return decode_images(model, params, 1.0, latents, batch_size)


def psnr(images: np.ndarray, recon: np.ndarray) -> float:
  """Mean over images of the PSNR (dB) between uint8 images (peak 255)."""
  diff = images.astype(np.float64) - recon.astype(np.float64)
  mse = np.maximum(np.mean(np.square(diff), axis=(1, 2, 3)), 1e-10)
  return float(np.mean(10.0 * np.log10(255.0**2 / mse)))


def compute_scale_factor(model, params, images_uint8: np.ndarray, batch_size: int) -> float:
  """1 / std of the latents over `images_uint8`.

  We use the posterior MEANS (deterministic, what `encode_images` returns by
  default); SD/LDM use one posterior sample per image, which with a small KL
  weight differs by the tiny posterior variance only. The std is over all
  latent elements about their overall mean, as torch's `z.flatten().std()`.
  """
  z = encode_images(model, params, 1.0, images_uint8, batch_size).astype(np.float64)
  std = float(np.std(z))
  if not math.isfinite(std) or std <= 0:
    raise errors.TrainingDiverged(f'The latents have std {std}: cannot compute the scale factor.')
  return 1.0 / std


# --- Training --------------------------------------------------------------------------------

def split_eval(images: np.ndarray, config) -> tuple[np.ndarray, np.ndarray]:
  """(train, eval): the last train.num_eval_images images are held out of training."""
  n = config.train.num_eval_images
  if n >= len(images):
    raise errors.ConfigError(f'train.num_eval_images={n} leaves no training image: the data set has '
                     f'{len(images)} images.')
  return images[:-n], images[-n:]


class Experiment(experiment.Experiment):
  """Stage 1: the autoencoder and its patch discriminator, one step for both; held-out
  PSNR and reconstruction grids; the latent scale factor after the last step."""
  name = 'autoencoder'
  run_keys = vae_base.RUN_KEYS

  def validate(self):
    vae_base.validate(self.config)
    self.lpips_params = load_lpips(self.config)  # A bad file fails here, before any compute.

  def setup(self):
    self.train_images, self.eval_images = split_eval(data.load_dataset(self.config.data),
                                                     self.config)
    if self.lpips_params is not None:
      self.lpips_params = mesh_lib.place(self.lpips_params, self.mesh)

  @functools.cached_property
  def nets(self):
    return (build_model(self.config), build_discriminator(self.config), *make_optimizers(self.config))

  def init_state(self):
    return init_state(self.config, *self.nets)

  def param_trees(self, state):
    return {'autoencoder': state.params, 'discriminator': state.disc_params}

  def make_step(self, shardings):
    return make_train_step(self.config, *self.nets, self.mesh, self.lpips_params, shardings)

  def batches(self, start):
    return data.BatchIterator(self.train_images, self.config.train.batch_size,
                              seed=self.config.seed, step=start)

  def constants(self):
    return () if self.lpips_params is None else (self.lpips_params,)

  def hooks(self, writer):
    t, model, eval_images = self.config.train, self.nets[0], self.eval_images

    def evaluate(step, state):
      recon = reconstruct(model, state.params, eval_images, t.batch_size)
      value = psnr(eval_images, recon)
      writer.write_scalars(step, {'eval_psnr': value})
      logging.info('step %d: reconstruction PSNR %.2f dB on %d held-out images.', step, value,
                   len(eval_images))
      k = min(len(eval_images), 8)
      grid = imageio.make_grid(np.concatenate([eval_images[:k], recon[:k]]), ncol=k)
      logs.write_image_grid(writer, step, 'reconstructions', grid)
      if jax.process_index() == 0:
        imageio.save_image(grid, self.workdir / 'reconstructions' / f'{step:08d}.png')

    return [loop.Hook(t.eval_every, evaluate, 'evaluating held-out reconstructions')]

  def finish(self, state, ckpt, writer, start):
    """Recomputes the scale factor when this call trained (the old one, if any, is stale) or
    none is stored, and rewrites the final checkpoint with it."""
    t = self.config.train
    if int(state.step) == t.num_steps and (start < t.num_steps or not float(state.scale_factor) > 0):
      state = _store_scale_factor(state, self.nets[0], self.train_images, self.config, ckpt,
                                  writer)
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from the workdir's last checkpoint) and returns the final state.

  At the last step the scale factor is computed and the final checkpoint
  rewritten with it, also for a run that had already finished without it.
  """
  return experiment.train_and_evaluate(Experiment(config), workdir)


def _store_scale_factor(state, model, train_images, config, ckpt, writer) -> TrainState:
  """Computes the scale factor and rewrites the final checkpoint with it."""
  t = config.train
  images = train_images[:t.scale_factor_images]
  value = compute_scale_factor(model, state.params, images, t.batch_size)
  logging.info('Latent scale factor 1/std = %.5f (posterior means of %d training images).',
               value, len(images))
  writer.write_scalars(int(state.step), {'scale_factor': value})
  state = state.replace(scale_factor=jax.device_put(jnp.float32(value), state.step.sharding))
  # Orbax will not overwrite a step: replace the final checkpoint. Were the process killed in
  # between, the next run resumes from the previous checkpoint and redoes the last steps.
  ckpt.wait()
  step = int(state.step)
  if step in ckpt.all_steps():
    ckpt.manager.delete(step)
  ckpt.save(step, state, force=True)
  ckpt.wait()
  return state


# --- Loading a trained stage 1 ---------------------------------------------------------------

def load_vae(workdir: str | Path):
  """(model, params, scale_factor, config) of a finished stage-1 run, read-only.

  Reads WORKDIR/config.json (written by train_and_evaluate) and restores the
  latest checkpoint without touching the workdir.
  """
  workdir = Path(workdir)
  config_file = workdir / 'config.json'
  how_to_train = f'train stage 1 first: {TRAIN_COMMAND.replace("...", str(workdir))}'
  if not config_file.exists():
    raise errors.MissingFileError(f'No stage-1 autoencoder in {workdir} (no config.json): '
                            f'{how_to_train}')
  config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
  if config.get('stage') != 'vae':
    raise errors.ConfigError(f'{config_file} is a {config.get("stage")!r} config, not a stage-1 (vae) one.')
  exp = Experiment(config)
  # This process's devices, whatever mesh stage 1 trained on (its config.json's mesh.fsdp may
  # not divide them); stage 2 then places the weights on its own mesh.
  exp.mesh = mesh_lib.make_mesh()
  state = experiment.restore_for_sampling(exp, workdir, how_to_train)
  model = exp.nets[0]
  scale_factor = float(state.scale_factor)
  if not scale_factor > 0:
    raise errors.ConfigError(
        f'The stage-1 run in {workdir} has no latent scale factor (it is computed at the last '
        f'step, {config.train.num_steps}; the checkpoint is at step {int(state.step)}): finish '
        f'it by rerunning {TRAIN_COMMAND.replace("...", str(workdir))} with its config.')
  logging.info('Loaded the stage-1 autoencoder of step %d from %s (scale factor %.5f).',
               int(state.step), workdir, scale_factor)
  return model, state.params, scale_factor, config
