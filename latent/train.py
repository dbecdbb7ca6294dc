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

from common import data, experiment, imageio, logs, loop, lora, mesh as mesh_lib, optim
from ddpm import diffusion, samplers
from ddpm import train as ddpm_train
from latent import conditions as conditions_lib
from latent import controlnet, guidance, hypernetwork, vae_train
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

  @classmethod
  def from_vae(cls, model, params, scale_factor: float) -> 'Stage1':
    """A VAE from elsewhere (a Stable Diffusion pipeline folder's)."""
    self = cls.__new__(cls)
    self.workdir, self.config = None, None
    self.model, self.params, self.scale_factor = model, params, scale_factor
    self.factor = model.downsampling_factor
    self.latent_channels = model.latent_channels
    return self

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


def init_state(config, model: LatentDenoiser, tx, rules=None) -> ddpm_train.TrainState:
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  u = model.unet
  z = jnp.zeros((1, u.sample_size, u.sample_size, u.in_channels))
  ids = jnp.zeros((1, model.context_length), jnp.int32)
  params = model.init(init_rng, z, jnp.zeros((1,), jnp.int32), ids,
                      method=LatentDenoiser.init_all)['params']
  return ddpm_train.new_state(params, tx, rules or ddpm_train.rules_of(config), state_rng)


def denoise(model: LatentDenoiser, params, z, t, context, mask, **kwargs):
  """The denoiser's output; a hypernetwork in `params` acts on the cross-attention context."""
  with hypernetwork.applied(params):
    return model.apply({'params': params}, z, t, context, mask, **kwargs)


def condition(model: LatentDenoiser, params, ids):
  """(context, mask) of condition ids, and the null (context, mask) of the same batch."""
  context, mask = model.apply({'params': params}, ids, method='encode')
  null, null_mask = model.apply({'params': params}, ids.shape[0], method='null')
  return context, mask, null, null_mask


def train_step(state, batch, vae_params, *, config, model, schedule, tx, stage1, rules):
  """One step on a batch {'ids', and 'images' (uint8) or the cached 'mean'/'std' [B, 2, ...]}.

  The randomness (flips, posterior samples, condition dropout, t, eps) is drawn for the
  whole batch first, so train.grad_accum_steps micro-batches give the same update.
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

  def loss_fn(params, mb):
    params = lora.merged(params)  # W + scale A B where adapters are (common.lora); else itself.
    context, mask, null, null_mask = condition(model, params, mb['ids'])
    context, mask = guidance.use_null_where(mb['dropped'], context, mask, null, null_mask)
    control = controlnet.as_input(mb['control']) if 'control' in mb else None
    model_fn = lambda zt, t: denoise(model, params, zt, t, context, mask, train=True,
                                     control=control, rngs={'dropout': dropout_rng})
    return diffusion.denoising_loss(schedule, model_fn, mb['z0'], mb['t'], mb['eps'],
                                    config.diffusion.prediction, config.diffusion.min_snr_gamma,
                                    mb['weight'])

  (loss, aux), grads = optim.value_and_grad(loss_fn, state.params, rules, inputs,
                                            config.train.grad_accum_steps)
  metrics = {'loss': loss, 'mse': aux['mse'], 'grad_norm': optax.global_norm(grads)}
  return ddpm_train.apply_gradients(state, grads, tx, config.train, rules), metrics


def make_sample_fn(config, model: LatentDenoiser, schedule, stage1: Stage1,
                   strength: float = 1.0, inpaint: bool = False, decode: bool = True,
                   options: dict | None = None, guess_mode: bool = False):
  """jit(fn(params, vae_params, rng, ids, noise, guidance_scale, init_z0, keep, control,
  control_scale) -> images).

  Classifier-free guided sampling with the config's sampler, decoded to [-1, 1].
  `init_z0` (scaled latents) starts image-to-image at `strength`; with `inpaint`,
  latents where `keep` [B, h, w, 1] is 1 are re-imposed from init_z0, noised to
  the current step, after every step (and exactly at the end). decode=False
  returns the scaled latents instead of images. `options` override the config's sampler
  settings (a pipeline's steps_offset, say). `control` [B, H, W, C] in [0, 1] steers a
  model with a ControlNet at `control_scale`; in `guess_mode` the ControlNet's residuals
  are scaled as diffusers' guess mode and reach the conditional half only, as in its
  pipeline.
  """

  def sample_fn(params, vae_params, rng, ids, noise, guidance_scale, init_z0=None, keep=None,
                control=None, control_scale=1.0):
    params = lora.merged(params)
    context, mask, null, null_mask = condition(model, params, ids)
    extra = {}
    if control is not None:
      both, scale = controlnet.for_guidance(control, control_scale, guess_mode)
      extra = dict(control=both, control_scale=scale, guess_mode=guess_mode)
    apply = lambda x, t, c, m: denoise(model, params, x, t, c, m, **extra)
    model_fn = guidance.guided_model_fn(apply, context, mask, null, null_mask, guidance_scale)
    z0 = samplers.sample(schedule, model_fn, noise, rng,
                         **samplers.options_from_config(config, **(options or {})),
                         inject=samplers.reimposing(init_z0, keep) if inpaint else None,
                         init_x0=init_z0 if strength < 1.0 else None, strength=strength)
    return stage1.decode(vae_params, z0) if decode else z0

  return jax.jit(sample_fn)


def build_dataset(conds: conditions_lib.Conditions, images, captions):
  """(images, condition ids) of the examples the conditioning can use."""
  ids, keep = conds.training_ids(captions)
  return images[keep], ids[keep]


def latent_cache(workdir: Path, stage1: Stage1, images: np.ndarray, batch_size: int,
                 filename: str = CACHE):
  """Posterior moments of every image and its mirror image, computed once per data set and VAE.

  Returns {'mean', 'std'}: [N, 2, h, w, c] float32 ([:, 1] is the flipped image's).
  """
  path = workdir / filename
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


class Experiment(ddpm_train.Experiment):
  """Stage 2: ddpm's state, EMA and optimiser around the conditional latent denoiser; the
  frozen VAE is a step argument; the hook samples captioned prompt grids."""
  name = 'latent denoiser'
  run_keys = ldm_base.RUN_KEYS

  def validate(self):
    ldm_base.validate(self.config)
    self.stage1 = Stage1(self.config.vae_workdir)  # Fails early, naming the missing workdir.
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
    grid_fn = make_sample_fn(config, self.model, self.schedule, self.stage1,
                             options=self.sampler_options())
    prompts = list(t.grid_prompts)
    per_prompt = max(1, t.num_grid_samples // len(prompts))
    grid_ids = self.conds.prompt_ids([p for p in prompts for _ in range(per_prompt)])
    u = self.model.unet
    grid_noise = jax.random.normal(jax.random.PRNGKey(config.seed + 1),
                                   (len(grid_ids), u.sample_size, u.sample_size, u.in_channels))

    def write_grid(step, state):
      params = self.rules.with_ema(state.params, state.ema_params)
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
