"""Stage 2: training the conditional latent denoiser, `train_and_evaluate(config, workdir)`.

The frozen stage-1 VAE maps images to latents z0 = scale_factor * z (either
every step, or once into a cache of posterior means and stds in the workdir);
the denoiser learns eps(z_t, t, context) with ddpm's loss and schedules, its
context dropped to the learned null context with probability p for
classifier-free guidance. State, EMA, optimiser, checkpoints, resume and the
loop are ddpm's and common's.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from common import atomic, data, experiment, imageio, logs, loop, lora, mesh as mesh_lib, optim
from ddpm import diffusion
from ddpm import train as ddpm_train
from latent.configs import ldm_base
from latent.controlnet import model as controlnet_lib
from latent.ldm import conditions as conditions_lib
from latent.ldm import guidance, sampler
from latent.ldm.sampler import condition, denoise
from latent.ldm.unet import ConditionalUNet, LatentDenoiser
from latent.vae.codec import Codec

CACHE = 'latent_cache.npz'


def build_model(config: ml_collections.ConfigDict, conds: conditions_lib.Conditions,
                stage1: Codec) -> LatentDenoiser:
  m, c = config.model, config.conditioning
  unet = ConditionalUNet(
      sample_size=config.data.image_size // stage1.factor,
      in_channels=stage1.latent_channels, out_channels=stage1.latent_channels,
      block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
      attention_resolutions=tuple(m.attention_resolutions), head_dim=m.head_dim,
      mid_attention=m.mid_attention, norm_groups=m.norm_groups, dropout=m.dropout,
      dtype=jnp.bfloat16 if m.dtype == 'bfloat16' else jnp.float32,
      transformer_depth=m.transformer_depth, remat=m.remat, name='unet')
  return LatentDenoiser(unet, conds.encoder(c), conds.context_length, c.width)


def init_state(config, model: LatentDenoiser, tx, rules=None) -> ddpm_train.TrainState:
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  u = model.unet
  z = jnp.zeros((1, u.sample_size, u.sample_size, u.in_channels))
  ids = jnp.zeros((1, model.context_length), jnp.int32)
  params = model.init(init_rng, z, jnp.zeros((1,), jnp.int32), ids,
                      method=LatentDenoiser.init_all)['params']
  return ddpm_train.new_state(params, tx, rules or ddpm_train.rules_of(config), state_rng)


def train_step(state, batch, vae_params, *, config, model, schedule, tx, stage1, rules):
  """One step on a batch {'ids', and 'images' (uint8) or the cached 'mean'/'std' [B, 2, ...]}.

  The randomness (flips, posterior samples, condition dropout, t, eps) is drawn for the
  whole batch first, and dropout's masks per example (`optim.value_and_grad`'s `rng`), so
  train.grad_accum_steps micro-batches give the same update.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  flip_rng, post_rng, drop_rng, loss_rng, dropout_rng = jax.random.split(rng, 5)
  ids = batch['ids']
  b = ids.shape[0]
  flip = jax.random.bernoulli(flip_rng, 0.5, (b,)) & config.train.hflip
  if 'images' in batch:
    images = jnp.where(flip[:, None, None, None], batch['images'][:, :, ::-1], batch['images'])
    mean, std = stage1.moments(vae_params, images)
  else:  # The cache holds [unflipped, flipped] moments.
    pick = lambda a: jnp.take_along_axis(a, flip.astype(jnp.int32)[:, None, None, None, None],
                                         axis=1)[:, 0]
    mean, std = pick(batch['mean']), pick(batch['std'])
  z0 = stage1.scale_factor * (mean + std * jax.random.normal(post_rng, mean.shape))
  z0 = jax.lax.stop_gradient(z0)
  dropped = jax.random.bernoulli(drop_rng, config.conditioning.dropout_prob, (b,))
  t, eps = diffusion.draw_t_eps(schedule, loss_rng, z0)
  # Per-example loss weights (fine-tuning's prior-preservation examples), else all 1.
  weight = batch.get('weight', jnp.ones((b,), jnp.float32))
  inputs = {'ids': ids, 'dropped': dropped, 'z0': z0, 't': t, 'eps': eps, 'weight': weight}
  if 'control' in batch:  # A ControlNet's uint8 control maps, mirrored with their images.
    inputs['control'] = jnp.where(flip[:, None, None, None], batch['control'][:, :, ::-1],
                                  batch['control'])

  def loss_fn(params, mb, dropout_rng):
    params = lora.merged(params)  # W + scale A B where adapters are (common.lora); else itself.
    context, mask, null, null_mask = condition(model, params, mb['ids'])
    context, mask = guidance.use_null_where(mb['dropped'], context, mask, null, null_mask)
    control = controlnet_lib.as_input(mb['control']) if 'control' in mb else None
    model_fn = lambda zt, t: denoise(model, params, zt, t, context, mask, train=True,
                                     control=control, rngs={'dropout': dropout_rng})
    return diffusion.denoising_loss(schedule, model_fn, mb['z0'], mb['t'], mb['eps'],
                                    config.diffusion.prediction, config.diffusion.min_snr_gamma,
                                    mb['weight'])

  (loss, aux), grads = optim.value_and_grad(loss_fn, state.params, rules, inputs,
                                            config.train.grad_accum_steps, rng=dropout_rng)
  metrics = {'loss': loss, 'mse': aux['mse'], 'grad_norm': optax.global_norm(grads)}
  return ddpm_train.apply_gradients(state, grads, tx, config.train, rules), metrics


def build_dataset(conds: conditions_lib.Conditions, images, captions):
  """(images, condition ids) of the examples the conditioning can use."""
  ids, keep = conds.training_ids(captions)
  return images[keep], ids[keep]


def latent_cache(workdir: Path, stage1: Codec, images: np.ndarray, batch_size: int,
                 filename: str = CACHE):
  """Posterior moments of every image and its mirror image, computed once per data set and VAE.

  Returns {'mean', 'std'}: [N, 2, h, w, c] float32 ([:, 1] is the flipped image's).
  """
  path = workdir / filename
  # The data (count, a sample of pixels) and the VAE's weights (step, scale, parameter hash).
  fingerprint = np.array(f'images={len(images)}:{int(images[::max(1, len(images) // 64)].sum())} '
                         f'vae {stage1.fingerprint}')
  if path.is_file():
    with np.load(path) as f:
      if 'fingerprint' in f and f['fingerprint'].dtype.kind == 'U' and str(
          f['fingerprint']) == str(fingerprint):
        logging.info('Using the latent cache %s.', path)
        return {'mean': f['mean'], 'std': f['std']}
    logging.info('The latent cache %s belongs to other data or another VAE: rebuilding.', path)
  encode = jax.jit(stage1.moments)
  means, stds = [], []
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    both = np.concatenate([chunk, chunk[:, :, ::-1]])
    mean, std = jax.device_get(encode(stage1.params, both))
    means.append(np.stack([mean[:len(chunk)], mean[len(chunk):]], axis=1))
    stds.append(np.stack([std[:len(chunk)], std[len(chunk):]], axis=1))
  cache = {'mean': np.concatenate(means), 'std': np.concatenate(stds)}
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)  # A fresh workdir is made here, first.
    # Atomic: a killed run never leaves half a cache.
    atomic.write_file(path, lambda tmp: np.savez(tmp, fingerprint=fingerprint, **cache))
  logging.info('Wrote the latent cache %s (%d images).', path, len(images))
  return cache


class Experiment(ddpm_train.Experiment):
  """Stage 2: ddpm's state, EMA and optimiser around the conditional latent denoiser; the
  frozen VAE is a step argument; the hook samples captioned prompt grids."""
  name = 'latent denoiser'
  run_keys = ldm_base.RUN_KEYS

  def validate(self):
    ldm_base.validate(self.config)
    self.stage1 = Codec.from_workdir(self.config.vae_workdir)  # Fails early, naming the missing workdir.
    ldm_base.validate(self.config, self.stage1.factor)

  def setup(self):
    config, workdir = self.config, self.workdir
    images, captions = data.load_captioned_dataset(config.data)
    if (workdir / conditions_lib.FILENAME).is_file():
      self.conds = conditions_lib.Conditions.load(workdir)  # Resuming: its vocabulary.
    else:
      self.conds = conditions_lib.Conditions.from_captions(config.conditioning, captions)
    images, ids = build_dataset(self.conds, images, captions)
    self.examples = {'ids': ids}
    if config.train.latent_cache:
      self.examples.update(latent_cache(workdir, self.stage1, images, config.sample.batch_size))
    else:
      self.examples['images'] = images
    self.vae_params = mesh_lib.place(self.stage1.params, self.mesh)

  def record(self):
    if jax.process_index() == 0 and not (self.workdir / conditions_lib.FILENAME).is_file():
      self.conds.save(self.workdir)

  @functools.cached_property
  def model(self):
    return build_model(self.config, self.conds, self.stage1)

  def init_state(self):
    return init_state(self.config, self.model, self.tx, self.rules)

  def make_step(self, shardings):
    step = functools.partial(train_step, config=self.config, model=self.model,
                             schedule=self.schedule, tx=self.tx, stage1=self.stage1,
                             rules=self.rules)
    return loop.jit_step(step, self.mesh, shardings,
                         (jax.tree.map(lambda x: x.sharding, self.vae_params),))

  def batches(self, start):
    return data.BatchIterator(self.examples, self.config.train.batch_size,
                              seed=self.config.seed, step=start)

  def constants(self):
    return (self.vae_params,)

  def sampler_options(self) -> dict:
    """Overrides of the config's sampler settings (none here)."""
    return {}

  def hooks(self, writer):
    config, t = self.config, self.config.train
    grid_fn = sampler.for_config(config, self.model, self.schedule, self.stage1,
                                 self.sampler_options())
    prompts = list(t.grid_prompts)
    per_prompt = max(1, t.num_grid_samples // len(prompts))
    grid_ids = self.conds.prompt_ids([p for p in prompts for _ in range(per_prompt)])
    u = self.model.unet
    grid_noise = jax.random.normal(jax.random.PRNGKey(config.seed + 1),
                                   (len(grid_ids), u.sample_size, u.sample_size, u.in_channels))

    def write_grid(step, state):
      params = self.rules.of_state(state)
      x = grid_fn(params, self.vae_params, jax.random.PRNGKey(config.seed + 2), grid_ids,
                  grid_noise, config.sample.guidance_scale)
      grid = imageio.captioned_grid(imageio.to_uint8(mesh_lib.gather(x)), prompts, per_prompt)
      logs.write_image_grid(writer, step, 'ema_prompt_grid', grid)
      if jax.process_index() == 0:
        imageio.save_image(grid, self.workdir / 'samples_during_training' / f'{step:08d}.png')

    return [loop.Hook(t.sample_every, write_grid, 'sampling the prompt grid')]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> ddpm_train.TrainState:
  """Trains stage 2 on the VAE of config.vae_workdir, resuming from the workdir."""
  return experiment.train_and_evaluate(Experiment(config), workdir)
