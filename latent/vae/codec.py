"""A trained stage 1 as stage 2 uses it: images <-> scaled latents, and `load_vae`.

Everything here is jittable maths or batched calls of it, plus reading a finished
stage-1 workdir read-only: its state's layout (latent.vae.state, the discriminator's module
included) but not LPIPS or the training step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import errors, experiment, imageio, mesh as mesh_lib
from latent.vae import autoencoder, state as state_lib

TRAIN_COMMAND = 'python -m latent.main --config=latent/configs/vae_anime.py --workdir=...'

def encode_latents(model: autoencoder.AutoencoderKL, params, scale_factor, images_uint8,
                   rng: jax.Array | None = None) -> jnp.ndarray:
  """uint8 [B, H, W, 3] -> scale_factor * z, z the posterior mean (rng None) or a sample.

  Jittable. The scale factor was measured on posterior means (see
  `compute_scale_factor`); with kl_weight=1e-6 the posterior std is small
  next to the spread of the means, so samples have nearly the same scale.
  """
  x = imageio.to_unit(jnp.asarray(images_uint8))
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
  """fn(batch index, x) over `array` in equal batches sharded over the local mesh."""
  mesh = mesh_lib.make_mesh()
  return np.concatenate([mesh_lib.gather(fn(i, x))[:count] for i, (_, x, count) in
                         enumerate(mesh_lib.padded_batches(array, batch_size, mesh))])


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



class Codec:
  """A frozen VAE and its latent scale factor: uint8 images -> posterior moments, scaled
  latents -> images. Stage 2's and fine-tuning's `stage1`; a pipeline folder's VAE too."""

  def __init__(self, model: autoencoder.AutoencoderKL, params, scale_factor: float,
               step: int | None = None):
    self.model, self.params, self.scale_factor = model, params, scale_factor
    self.step = step  # The stage-1 checkpoint's (None: a pipeline folder's VAE).
    self.factor = model.downsampling_factor
    self.latent_channels = model.latent_channels

  @classmethod
  def from_workdir(cls, workdir: str | Path) -> 'Codec':
    """The VAE of a finished stage-1 run (`load_vae`)."""
    model, params, scale_factor, _, step = restore_vae(workdir)
    return cls(model, params, scale_factor, step)

  @functools.cached_property
  def fingerprint(self) -> str:
    """What identifies these weights: the checkpoint step, the scale factor and a hash of
    every parameter's bytes (a stage 1 retrained in the same workdir has another)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(self.params):
      digest.update(jax.tree_util.keystr(path).encode())
      digest.update(np.ascontiguousarray(mesh_lib.gather(leaf)).tobytes())
    return f'step={self.step} scale={self.scale_factor!r} params={digest.hexdigest()[:16]}'

  def moments(self, params, images_uint8):
    """uint8 images -> (mean, std) of q(z|x), unscaled."""
    mean, logvar = self.model.apply({'params': params}, imageio.to_unit(images_uint8),
                                    method=self.model.encode)
    return mean, jnp.exp(0.5 * logvar)

  def encode(self, params, images_uint8, keep=None):
    """uint8 images -> scaled posterior means; with `keep` [B, H, W, 1] (per pixel, or
    [B, h, w, 1] on the latent grid: each patch's pixels), the pixels where it is 0 are set
    to 0 in [-1, 1] first (the masked picture an inpainting U-Net is given)."""
    x = imageio.to_unit(images_uint8)
    if keep is not None:
      f = x.shape[1] // keep.shape[1]
      x = x * jnp.repeat(jnp.repeat(keep, f, axis=1), f, axis=2).astype(x.dtype)
    mean, _ = self.model.apply({'params': params}, x, method=self.model.encode)
    return self.scale_factor * mean

  def decode(self, params, z0):
    """Scaled latents -> images in [-1, 1]."""
    return decode_latents(self.model, params, self.scale_factor, z0)


# --- Loading a trained stage 1 ---------------------------------------------------------------

def load_vae(workdir: str | Path):
  """(model, params, scale_factor, config) of a finished stage-1 run, read-only.

  Reads WORKDIR/config.json (written by train_and_evaluate) and restores the
  latest checkpoint without touching the workdir.
  """
  return restore_vae(workdir)[:4]


def restore_vae(workdir: str | Path):
  """load_vae's (model, params, scale_factor, config) and the checkpoint's step."""
  workdir = Path(workdir)
  config_file = workdir / 'config.json'
  how_to_train = f'train stage 1 first: {TRAIN_COMMAND.replace("...", str(workdir))}'
  if not config_file.exists():
    raise errors.MissingFileError(f'No stage-1 autoencoder in {workdir} (no config.json): '
                            f'{how_to_train}')
  config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
  if config.get('stage') != 'vae':
    raise errors.ConfigError(f'{config_file} is a {config.get("stage")!r} config, not a stage-1 (vae) one.')
  exp = state_lib.StateExperiment(config)
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
  return model, state.params, scale_factor, config, int(state.step)
