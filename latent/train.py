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

from common import data, imageio, logs, loop, mesh as mesh_lib, optim
from ddpm import diffusion, samplers
from ddpm import train as ddpm_train
from latent import conditions as conditions_lib
from latent import guidance, vae_train
from latent.configs import ldm_base
from latent.unet import ConditionalUNet, LatentDenoiser

CACHE = 'latent_cache.npz'


class Stage1:
  """The frozen VAE of a stage-1 workdir: encode to scaled latents, decode back to pixels."""

  def __init__(self, workdir: str | Path):
    self.workdir = Path(workdir)
    self.model, self.params, self.scale_factor, self.config = vae_train.load_vae(workdir)
    self.factor = self.model.downsampling_factor
    self.latent_channels = self.model.latent_channels

  def moments(self, params, images_uint8):
    """uint8 images -> (mean, std) of q(z|x), unscaled."""
    x = images_uint8.astype(jnp.float32) / 127.5 - 1.0
    mean, logvar = self.model.apply({'params': params}, x, method=self.model.encode)
    return mean, jnp.exp(0.5 * logvar)

  def decode(self, params, z0):
    """Scaled latents -> images in [-1, 1]."""
    return vae_train.decode_latents(self.model, params, self.scale_factor, z0)


def build_model(config: ml_collections.ConfigDict, conds: conditions_lib.Conditions,
                stage1: Stage1) -> LatentDenoiser:
  m, c = config.model, config.conditioning
  unet = ConditionalUNet(
      sample_size=config.data.image_size // stage1.factor,
      in_channels=stage1.latent_channels, out_channels=stage1.latent_channels,
      block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
      attention_resolutions=tuple(m.attention_resolutions), head_dim=m.head_dim,
      mid_attention=m.mid_attention, norm_groups=m.norm_groups, dropout=m.dropout,
      dtype=jnp.bfloat16 if m.dtype == 'bfloat16' else jnp.float32,
      transformer_depth=m.transformer_depth, name='unet')
  return LatentDenoiser(unet, conds.encoder(c), conds.context_length, c.width)


def init_state(config, model: LatentDenoiser, tx) -> ddpm_train.TrainState:
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  u = model.unet
  z = jnp.zeros((1, u.sample_size, u.sample_size, u.in_channels))
  ids = jnp.zeros((1, model.context_length), jnp.int32)
  params = model.init(init_rng, z, jnp.zeros((1,), jnp.int32), ids,
                      method=LatentDenoiser.init_all)['params']
  return ddpm_train.TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                               opt_state=tx.init(params), rng=state_rng)


def condition(model: LatentDenoiser, params, ids):
  """(context, mask) of condition ids, and the null (context, mask) of the same batch."""
  context, mask = model.apply({'params': params}, ids, method=LatentDenoiser.encode)
  null, null_mask = model.apply({'params': params}, ids.shape[0], method=LatentDenoiser.null)
  return context, mask, null, null_mask


def train_step(state, batch, vae_params, *, config, model, schedule, tx, stage1):
  """One step on a batch {'ids', and 'images' (uint8) or the cached 'mean'/'std' [B, 2, ...]}."""
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

  def loss_fn(params):
    context, mask, null, null_mask = condition(model, params, ids)
    context, mask, _ = guidance.drop_condition(drop_rng, context, mask, null, null_mask,
                                               config.conditioning.dropout_prob)
    model_fn = lambda zt, t: model.apply({'params': params}, zt, t, context, mask, train=True,
                                         rngs={'dropout': dropout_rng})
    return diffusion.diffusion_loss(schedule, model_fn, z0, loss_rng,
                                    config.diffusion.prediction, config.diffusion.min_snr_gamma)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {'loss': loss, 'mse': aux['mse'], 'grad_norm': optax.global_norm(grads)}
  return ddpm_train.apply_gradients(state, grads, tx, config.train), metrics


def make_sample_fn(config, model: LatentDenoiser, schedule, stage1: Stage1,
                   strength: float = 1.0, inpaint: bool = False, decode: bool = True):
  """jit(fn(params, vae_params, rng, ids, noise, guidance_scale, init_z0, keep) -> images).

  Classifier-free guided sampling with the config's sampler, decoded to [-1, 1].
  `init_z0` (scaled latents) starts image-to-image at `strength`; with `inpaint`,
  latents where `keep` [B, h, w, 1] is 1 are re-imposed from init_z0, noised to
  the current step, after every step (and exactly at the end). decode=False
  returns the scaled latents instead of images.
  """

  def sample_fn(params, vae_params, rng, ids, noise, guidance_scale, init_z0=None, keep=None):
    context, mask, null, null_mask = condition(model, params, ids)
    apply = lambda x, t, c, m: model.apply({'params': params}, x, t, c, m)
    model_fn = guidance.guided_model_fn(apply, context, mask, null, null_mask, guidance_scale)
    def reimpose_known(x, t_next, key):
      """Inpainting: the kept region is the original noised to t_next (itself after the last step)."""
      tb = jnp.full((x.shape[0],), jnp.maximum(t_next, 0), jnp.int32)
      known = diffusion.q_sample(schedule, init_z0, tb, jax.random.normal(key, x.shape))
      known = jnp.where(t_next >= 0, known, init_z0)
      return keep * known + (1.0 - keep) * x
    z0 = samplers.sample(schedule, model_fn, noise, rng, **samplers.options_from_config(config),
                         inject=reimpose_known if inpaint else None,
                         init_x0=init_z0 if strength < 1.0 else None, strength=strength)
    return stage1.decode(vae_params, z0) if decode else z0

  return jax.jit(sample_fn)


def build_dataset(conds: conditions_lib.Conditions, images, captions):
  """(images, condition ids) of the examples the conditioning can use."""
  ids, keep = conds.training_ids(captions)
  return images[keep], ids[keep]


def latent_cache(workdir: Path, stage1: Stage1, images: np.ndarray, batch_size: int):
  """Posterior moments of every image and its mirror image, computed once per data set and VAE.

  Returns {'mean', 'std'}: [N, 2, h, w, c] float32 ([:, 1] is the flipped image's).
  """
  path = workdir / CACHE
  fingerprint = np.array([len(images), int(images[::max(1, len(images) // 64)].sum()),
                          int(stage1.scale_factor * 1e6)], np.int64)
  if path.is_file():
    with np.load(path) as f:
      if np.array_equal(f['fingerprint'], fingerprint):
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
    tmp = path.with_suffix('.tmp.npz')
    np.savez(tmp, fingerprint=fingerprint, **cache)
    tmp.replace(path)  # Atomic: a killed run never leaves half a cache.
  logging.info('Wrote the latent cache %s (%d images).', path, len(images))
  return cache


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> ddpm_train.TrainState:
  """Trains stage 2 on the VAE of config.vae_workdir, resuming from the workdir."""
  ldm_base.validate(config)
  stage1 = Stage1(config.vae_workdir)  # Fails early, naming the workdir, if stage 1 is missing.
  ldm_base.validate(config, stage1.factor)
  workdir = Path(workdir)
  loop.check_workdir(config, workdir, ldm_base.RUN_KEYS)
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(config.train.batch_size, mesh, 'train.batch_size')

  images, captions = data.load_captioned_dataset(config.data)
  if (workdir / conditions_lib.FILENAME).is_file():
    conds = conditions_lib.Conditions.load(workdir)  # Resuming: the vocabulary it trained with.
  else:
    conds = conditions_lib.Conditions.from_captions(config.conditioning, captions)
  images, ids = build_dataset(conds, images, captions)
  t = config.train
  examples = {'ids': ids}
  if t.latent_cache:
    examples.update(latent_cache(workdir, stage1, images, config.sample.batch_size))
  else:
    examples['images'] = images

  model = build_model(config, conds, stage1)
  schedule, tx = ddpm_train.build_schedule(config), ddpm_train.make_optimizer(config)
  with logs.Timed('initialising the denoiser'):
    state = jax.jit(functools.partial(init_state, config, model, tx),
                    out_shardings=mesh_lib.replicated(mesh))()
    ckpt, state, start = loop.resume(workdir, state, t)
  loop.record_config(config, workdir)  # Only now: everything above has been checked.
  if jax.process_index() == 0 and not (workdir / conditions_lib.FILENAME).is_file():
    conds.save(workdir)
  writer = logs.make_writer(workdir)
  logs.log_parameter_overview(state.params, 'latent denoiser', workdir)
  vae_params = mesh_lib.replicate(stage1.params, mesh)
  step_fn = loop.jit_step(functools.partial(
      train_step, config=config, model=model, schedule=schedule, tx=tx, stage1=stage1), mesh,
                          num_constants=1)

  grid_fn = make_sample_fn(config, model, schedule, stage1)
  prompts = list(t.grid_prompts)
  per_prompt = max(1, t.num_grid_samples // len(prompts))
  grid_ids = conds.prompt_ids([p for p in prompts for _ in range(per_prompt)])
  u = model.unet
  grid_noise = jax.random.normal(jax.random.PRNGKey(config.seed + 1),
                                 (len(grid_ids), u.sample_size, u.sample_size, u.in_channels))

  def write_grid(step, state):
    x = grid_fn(state.ema_params, vae_params, jax.random.PRNGKey(config.seed + 2), grid_ids,
                grid_noise, config.sample.guidance_scale)
    grid = imageio.captioned_grid(imageio.to_uint8(mesh_lib.gather(x)), prompts, per_prompt)
    logs.write_image_grid(writer, step, 'ema_prompt_grid', grid)
    if jax.process_index() == 0:
      imageio.save_image(grid, workdir / 'samples_during_training' / f'{step:08d}.png')

  learning_rate = optim.learning_rate_schedule(config.optim, t.num_steps)
  try:
    state = loop.run(
        state, step_fn, data.BatchIterator(examples, t.batch_size, seed=config.seed, step=start),
        mesh=mesh, num_steps=t.num_steps, ckpt=ckpt, writer=writer, log_every=t.log_every,
        checkpoint_every=t.checkpoint_every, items_per_step=t.batch_size, start=start,
        hooks=[loop.Hook(t.sample_every, write_grid, 'sampling the prompt grid')],
        scalars_fn=lambda step: {'learning_rate': float(learning_rate(step))},
        name='latent train step', constants=(vae_params,))
  finally:
    ckpt.close()
    writer.flush()
  return state
