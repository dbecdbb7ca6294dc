"""Super-resolution diffusion (SR3, Saharia et al. 2021), as Stable Diffusion's x4 upscaler.

The U-Net denoises the high-resolution image x_t with the low-resolution image, bicubic-
upsampled to the output size, concatenated on the channels (6 input channels). The
upsampled low-resolution copy is noised to a random level s during training (noise-conditioning
augmentation, Ho et al. 2021) and s, embedded like a timestep, is added to the time
embedding, so the model learns how much to trust its conditioning; sampling fixes
s = sample.noise_level. One model serves every factor in sr.factors: training draws a
factor per example, and the conditioning is always upsampled to data.image_size. With
sr.crop_size the U-Net (convolutions only) trains on random crops and upscales whole images.

  python -m ddpm.main --config=ddpm/configs/sr_anime.py --workdir=DIR          # train
  python -m ddpm.main --config=ddpm/configs/sr_anime.py --workdir=DIR --mode=upscale \\
      --config.sample.input=LOW_RES_FOLDER   # -> DIR/upscaled/<same file names>

Keys: ddpm/configs/sr_base.py.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import data, experiment, imageio, logs, loop, lora, mesh as mesh_lib
from common.errors import ConfigError, DataError
from ddpm import diffusion, models, schedules, train
from ddpm.configs import sr_base


# --- The maths (pure functions on [B, H, W, C] in [-1, 1]) ------------------------------------

def downsample(x: jnp.ndarray, factor: int, method: str = 'box') -> jnp.ndarray:
  """x at 1/factor of its size: 'box' averages factor x factor blocks (area), 'bicubic' is
  antialiased bicubic (PIL's resize)."""
  b, h, w, c = x.shape
  if method == 'box':
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
  if method == 'bicubic':
    return jax.image.resize(x, (b, h // factor, w // factor, c), 'bicubic', antialias=True)
  raise ValueError(f'Unknown downsampling {method!r}; valid: {", ".join(sr_base.DOWNSAMPLES)}.')


def upsample(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """Bicubic to size x size, clipped to [-1, 1]: the conditioning, and the baseline."""
  b, _, _, c = x.shape
  return jnp.clip(jax.image.resize(x, (b, size, size, c), 'bicubic'), -1.0, 1.0)


def quantize(x: jnp.ndarray) -> jnp.ndarray:
  """x on the uint8 grid, as a low-resolution image file holds it."""
  return jnp.round((x + 1.0) * 127.5) / 127.5 - 1.0


def low_res(x0: jnp.ndarray, factor: int, method: str = 'box') -> jnp.ndarray:
  """The low-resolution image of x0 (quantised to 8 bits)."""
  return quantize(downsample(x0, factor, method))


def noise_augment(noise_schedule: schedules.Schedule, cond: jnp.ndarray, s: jnp.ndarray,
                  eps: jnp.ndarray) -> jnp.ndarray:
  """The conditioning noised to level s [B]: q(z_s | z_0) of the augmentation schedule."""
  return diffusion.q_sample(noise_schedule, cond, s, eps)


def training_condition(rng, x0, *, factors, method: str, noise_schedule: schedules.Schedule,
                       max_noise_level: int) -> dict:
  """The SR U-Net's inputs for a batch of high-res x0: a factor drawn per example, its low-res
  copy upsampled back and noised to s ~ U{0..max_noise_level}."""
  f_rng, s_rng, e_rng = jax.random.split(rng, 3)
  b, size = x0.shape[0], x0.shape[1]
  every = jnp.stack([upsample(low_res(x0, f, method), size) for f in factors])  # [F, B, ...]
  cond = every[jax.random.randint(f_rng, (b,), 0, len(factors)), jnp.arange(b)]
  s = jax.random.randint(s_rng, (b,), 0, max_noise_level + 1)
  cond = noise_augment(noise_schedule, cond, s, jax.random.normal(e_rng, cond.shape))
  return {'low_res': cond, 'noise_level': s}


# --- The model --------------------------------------------------------------------------------

class SRUNet(models.UNet):
  """ddpm's U-Net on [x_t, upsampled low-res] (6 channels), with the low-res copy's noise level
  embedded like a timestep (sinusoid + MLP, `noise_level_embedding`) and added to the time
  embedding, as the class embedding of SD's x4 upscaler.

  Inputs may be smaller square crops than sample_size (sr.crop_size): the layers are
  convolutions, and attention sits where sample_size puts it."""
  in_channels: int = 6

  def check_input(self, x):
    step = 2**(len(self.block_out_channels) - 1)
    if (x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] != x.shape[2]
        or x.shape[1] % step or x.shape[1] > self.sample_size):
      raise ValueError(f'SRUNet expects [B, S, S, {self.in_channels}] inputs, S a multiple of '
                       f'{step} up to {self.sample_size}, got {x.shape}.')

  @nn.compact
  def __call__(self, x, t, train: bool = False, context=None, context_mask=None, control=None, *,
               low_res=None, noise_level=None):
    """eps/x0/v for x_t [B, S, S, 3] at t [B], given `low_res` [B, S, S, 3] (the low-resolution
    image upsampled to S, noised to `noise_level` [B])."""
    if low_res is None or noise_level is None:
      raise ValueError('SRUNet needs low_res (the upsampled low-resolution image) and its '
                       'noise_level.')
    if x.ndim != 4 or x.shape[-1] != self.out_channels or low_res.shape != x.shape:
      raise ValueError(f'SRUNet expects x_t [B, S, S, {self.out_channels}] and low_res of the same '
                       f'shape (the low-resolution image upsampled to S = {self.sample_size}), '
                       f'got {x.shape} and {low_res.shape}.')
    width = self.block_out_channels[0]
    level = jnp.broadcast_to(jnp.asarray(noise_level), (x.shape[0],))
    level_emb = models.TimestepEmbedding(4 * width, self.dtype, name='noise_level_embedding')(
        models.timestep_embedding(level, width).astype(self.dtype))

    # The U-Net body is ddpm's, unchanged: its embed_time only sees t, so the noise-level
    # embedding joins the time embedding through a method interceptor.
    def add_level(next_fun, args, kwargs, ctx):
      out = next_fun(*args, **kwargs)
      return out + level_emb if ctx.method_name == 'embed_time' and ctx.module is self else out

    with nn.intercept_methods(add_level):
      return super().__call__(jnp.concatenate([x, low_res.astype(x.dtype)], axis=-1), t, train,
                              context, context_mask, control)


def build_noise_schedule(config) -> schedules.Schedule:
  return schedules.make_schedule(config.sr.noise_schedule, config.diffusion.num_timesteps)


def make_upscale_fn(config, model: SRUNet, schedule, noise_schedule):
  """jit(fn(params, rng, low_res [B, h, w, 3] in [-1, 1]) -> x0 [B, S, S, 3] in [-1, 1]) with
  the config's sampler and s = sample.noise_level."""
  sample_fn = train.make_sample_fn(config, model, schedule)
  size = config.data.image_size

  def upscale_fn(params, rng, images):
    noise_rng, aug_rng, sample_rng = jax.random.split(rng, 3)
    cond = upsample(images, size)
    level = jnp.full((cond.shape[0],), config.sample.noise_level, jnp.int32)
    cond = noise_augment(noise_schedule, cond, level, jax.random.normal(aug_rng, cond.shape))
    x_T = jax.random.normal(noise_rng, cond.shape)
    return sample_fn(params, sample_rng, x_T, low_res=cond, noise_level=level)

  return jax.jit(upscale_fn)


def upscale_array(upscale_fn, params, images: np.ndarray, batch_size: int, rng, mesh,
                  progress: bool = False) -> np.ndarray:
  """uint8 low-res [N, h, w, 3] -> uint8 [N, S, S, 3], in batches of one compiled shape (the
  last padded), each split over the mesh's devices."""
  steps = mesh_lib.padded_batches(images, batch_size, mesh)
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    total = -(-len(images) // mesh_lib.device_batch(batch_size, len(images), mesh))
    steps = tqdm.tqdm(steps, desc=f'upscaling {images.shape[1]}px', unit='batch', total=total)
  out = []
  for start, x, count in steps:
    y = upscale_fn(params, jax.random.fold_in(rng, start), imageio.to_unit(x))
    out.append(imageio.to_uint8(mesh_lib.gather(y))[:count])
  return np.concatenate(out)


# --- Training ---------------------------------------------------------------------------------

class SRExperiment(train.Experiment):
  """ddpm's Experiment with the SR U-Net, its conditioning made on the fly from the batch's
  high-res images, a held-out tail of the data, and (bicubic | SR | original) grids."""
  name = 'SR U-Net'
  run_keys = sr_base.RUN_KEYS

  def validate(self):
    sr_base.validate(self.config)

  def setup(self):
    self.images, self.held_out = split_holdout(data.load_dataset(self.config.data),
                                               self.config.sr.holdout)

  @functools.cached_property
  def model(self):
    return train.build_model(self.config, SRUNet)

  @functools.cached_property
  def noise_schedule(self):
    return build_noise_schedule(self.config)

  def batches(self, start):
    batches = super().batches(start)
    crop = self.config.sr.crop_size
    if not crop or crop == self.config.data.image_size:
      return batches
    return CropIterator(batches, crop, tuple(self.config.sr.factors), self.config.seed)

  def init_state(self):
    size = self.config.data.image_size
    return train.init_state(self.config, self.model, self.tx, self.rules,
                            low_res=jnp.zeros((1, size, size, 3)),
                            noise_level=jnp.zeros((1,), jnp.int32))

  def make_step(self, shardings):
    sr = self.config.sr
    condition = functools.partial(training_condition, factors=tuple(sr.factors),
                                  method=sr.downsample, noise_schedule=self.noise_schedule,
                                  max_noise_level=sr.max_noise_level)
    return train.make_train_step(self.config, self.model, self.schedule, self.tx, self.mesh,
                                 shardings, condition, self.rules)

  def hooks(self, writer):
    config = self.config
    if not config.train.sample_every:
      return []
    upscale_fn = make_upscale_fn(config, self.model, self.schedule, self.noise_schedule)
    pool = self.held_out if len(self.held_out) else self.images
    originals = pool[:min(8, config.train.num_grid_samples, len(pool))]

    def write_grid(step, state):
      params = self.rules.of_state(state)
      grid = comparison_grid(config, upscale_fn, params, originals, self.mesh)
      logs.write_image_grid(writer, step, 'sr_bicubic_ema_original', grid)
      if jax.process_index() == 0:
        imageio.save_image(grid, self.workdir / 'samples_during_training' / f'{step:08d}.png')

    return [loop.Hook(config.train.sample_every, write_grid, 'upscaling the held-out grid')]


class CropIterator:
  """Random crop_size crops of another iterator's uint8 batches (one per image), offsets on the
  grid of every factor and a pure function of (seed, step), so resumed runs see the same."""

  def __init__(self, batches, crop_size: int, factors, seed: int):
    self.batches, self.crop_size, self.seed = batches, crop_size, seed
    self.grid = math.lcm(*factors)
    self.step = batches.step

  def __iter__(self):
    return self

  def __next__(self):
    images = next(self.batches)
    rng = np.random.default_rng([self.seed, self.step, 7])
    self.step += 1
    n, size = images.shape[:2]
    y, x = rng.integers(0, (size - self.crop_size) // self.grid + 1, (2, n)) * self.grid
    return np.stack([im[a:a + self.crop_size, b:b + self.crop_size]
                     for im, a, b in zip(images, y, x)])


def split_holdout(images: np.ndarray, holdout: int) -> tuple[np.ndarray, np.ndarray]:
  """(training images, the last `holdout` images)."""
  if holdout and holdout >= len(images):
    raise DataError(f'sr.holdout={holdout} leaves no training image of the {len(images)} loaded.')
  return images[:len(images) - holdout], images[len(images) - holdout:]


def degrade_uint8(images: np.ndarray, factor: int, method: str) -> np.ndarray:
  """uint8 high-res -> uint8 low-res files' content (what bench_sr.py and the grids feed in)."""
  return imageio.to_uint8(low_res(imageio.to_unit(jnp.asarray(images)), factor, method))


def bicubic_uint8(images: np.ndarray, size: int) -> np.ndarray:
  """The baseline: uint8 low-res -> uint8 bicubic at size x size (the model's conditioning)."""
  return imageio.to_uint8(upsample(imageio.to_unit(jnp.asarray(images)), size))


def comparison_grid(config, upscale_fn, params, originals: np.ndarray, mesh) -> np.ndarray:
  """Per factor, a row each of bicubic, SR and the originals."""
  rows, size = [], config.data.image_size
  for f in config.sr.factors:
    small = degrade_uint8(originals, f, config.sr.downsample)
    ours = upscale_array(upscale_fn, params, small, len(small),
                         jax.random.PRNGKey(config.sample.seed), mesh)
    rows += [bicubic_uint8(small, size), ours, originals]
  return imageio.make_grid(np.concatenate(rows), ncol=len(originals))


def train_and_evaluate(config, workdir: str):
  return experiment.train_and_evaluate(SRExperiment(config), workdir)


# --- --mode=upscale ---------------------------------------------------------------------------

def read_low_res(paths: list[Path], config) -> list[np.ndarray]:
  """Every input decoded (uint8 [h, w, 3]); a file that cannot be read, or whose size is not
  image_size / factor for a trained factor, is a DataError naming it."""
  size, factors = config.data.image_size, tuple(config.sr.factors)
  accepted = ', '.join(f'{size // f}x{size // f} (x{f})' for f in factors)
  images = []
  for path, img in imageio.iter_images(paths):
    if img is None:
      raise DataError(f'{path} cannot be read as an image; remove it from sample.input or '
                      're-save it.')
    h, w = img.shape[:2]
    if h != w or size % h or size // h not in factors:
      raise DataError(f'{path} is {w}x{h}, but this model upscales {accepted} to {size}x{size}: '
                      'resize the low-resolution images to one of those sizes.')
    images.append(img)
  return images


def output_folder(config, workdir) -> Path:
  return Path(config.sample.output_dir or Path(workdir) / 'upscaled')


def upscale(config, workdir: str | Path) -> Path:
  """--mode=upscale: every image under sample.input (recursive) upscaled to data.image_size and
  written under the same relative path and name in the output folder (never over an input).
  The inputs are checked before the checkpoint is read."""
  sr_base.validate(config)
  s = config.sample
  if not s.input:
    raise ConfigError('sample.input must name the folder of low-resolution images '
                      '(--config.sample.input=FOLDER).')
  src = Path(s.input)
  paths = imageio.list_images(src)
  out = output_folder(config, workdir)
  if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
    raise ConfigError(f'The output folder {out} is (inside) sample.input={src}: inputs are never '
                      'overwritten; set --config.sample.output_dir to another folder.')
  images = read_low_res(paths, config)

  exp = SRExperiment(config)
  params = lora.apply_files(exp.sampling_params(workdir, s.use_ema), s.adapters)
  upscale_fn = make_upscale_fn(config, exp.model, exp.schedule, exp.noise_schedule)
  rng = jax.random.PRNGKey(s.seed)
  start = time.perf_counter()
  for side in sorted({im.shape[0] for im in images}):  # One compiled shape per input size.
    idx = [i for i, im in enumerate(images) if im.shape[0] == side]
    logging.info('Upscaling %d images of %dx%d by %d (%s, %d steps, noise level %d).', len(idx),
                 side, side, config.data.image_size // side, s.sampler, s.num_steps, s.noise_level)
    ys = upscale_array(upscale_fn, params, np.stack([images[i] for i in idx]), s.batch_size,
                       jax.random.fold_in(rng, side), exp.mesh, progress=True)
    if jax.process_index() == 0:
      for i, y in zip(idx, ys):
        imageio.save_image(y, out / paths[i].relative_to(src))
  logging.info('Wrote %d upscaled images to %s in %.1f s.', len(images), out,
               time.perf_counter() - start)
  return out
