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
import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from common import data, errors, experiment, imageio, logs, loop, mesh as mesh_lib
from common import optim
from common import params as params_lib
from latent.configs import vae_base
from latent.vae import lpips, loss as vae_loss
from latent.vae import state as state_lib
from latent.vae.codec import encode_images, reconstruct
from latent.vae.state import TrainState, init_state


def train_step(state: TrainState, batch: jnp.ndarray, lpips_params=None, *, config, model, disc,
               tx, disc_tx, rules: params_lib.Rules):
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
  rng = jax.random.fold_in(state.rng, state.step)
  x = imageio.to_unit(batch)

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


def make_train_step(config, model, disc, tx, disc_tx, mesh, lpips_params=None, shardings=None,
                    rules: params_lib.Rules | None = None):
  """The jitted step(state, batch[, lpips_params]): the LPIPS weights (from load_lpips, placed
  on the mesh) are an argument, not ~59 MB of constants compiled into the program."""
  rules = rules or params_lib.Rules(config.get('params'))
  if shardings is None:
    init = functools.partial(init_state, config, model, disc, tx, disc_tx, rules)
    shardings = mesh_lib.state_shardings(jax.eval_shape(init), mesh, rules)
  step = functools.partial(train_step, config=config, model=model, disc=disc, tx=tx,
                           disc_tx=disc_tx, rules=rules)
  constants = () if lpips_params is None else (
      jax.tree.map(lambda x: x.sharding, lpips_params),)
  return loop.jit_step(step, mesh, shardings, constants)


def load_lpips(config):
  """The frozen LPIPS-VGG weights (numpy) when loss.lpips_weight > 0, else None."""
  l = config.loss
  return lpips.load_params(l.lpips_weights) if l.lpips_weight > 0 else None


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


class Experiment(state_lib.StateExperiment):
  """Stage 1: the autoencoder and its patch discriminator, one step for both; held-out
  PSNR and reconstruction grids; the latent scale factor after the last step."""

  def validate(self):
    vae_base.validate(self.config)
    self.lpips_params = load_lpips(self.config)  # A bad file fails here, before any compute.

  def setup(self):
    self.train_images, self.eval_images = split_eval(data.load_dataset(self.config.data),
                                                     self.config)
    if self.lpips_params is not None:
      self.lpips_params = mesh_lib.place(self.lpips_params, self.mesh)

  def make_step(self, shardings):
    return make_train_step(self.config, *self.nets, self.mesh, self.lpips_params, shardings,
                           self.rules)

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


