"""Every key of a latent/ stage-1 (autoencoder) config, with defaults; experiment configs override these.

`validate` runs before any data is read or any array is made, and names the
offending key.

Imports no model code (only `common`): the loss choice lists and the jax-free
checks (`discriminator_output_size`, `check_lpips`) are defined here, and
`latent.vae.loss` imports them from here.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from common import data, errors, mesh, optim, params
from common import config as config_lib

DTYPES = ('float32', 'bfloat16')
REC_LOSSES = ('l1', 'l2', 'l1+l2')  # Summed over pixels, as LDM (latent.vae.loss).
DISC_NORMS = ('group', 'none')      # The patch discriminator's norm (no BatchNorm: see vae_loss).

# LPIPS-VGG's converted weights (.npz), as latent/vae/lpips.py makes and loads them: the arrays of
# torchvision vgg16's 3x3 convs (by their index in `features`) in LPIPS' five slices, and one
# 1x1 head per slice. tests/test_configs.py checks these names against latent.vae.lpips.
_LPIPS_VGG16_CONVS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
LPIPS_KEYS = tuple(sorted(
    [f'lin{s}.kernel' for s in range(len(_LPIPS_VGG16_CONVS))]
    + [f'net.slice{s + 1}.{i}.{p}' for s, convs in enumerate(_LPIPS_VGG16_CONVS)
       for i in convs for p in ('bias', 'kernel')]))
VGG16_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'
_LPIPS_CONVERT = ('python -m latent.lpips convert --vgg vgg16-397923af.pth --lin vgg.pth '
                  '--out {out}')


# Settings a run's checkpoints depend on (common.loop.check_workdir): resuming with other
# values is an error. Stage 2 also rebuilds the autoencoder from them.
RUN_KEYS = ('data.image_size', 'vae', 'loss.disc_channels', 'loss.disc_layers',
            'loss.disc_norm')


def discriminator_output_size(image_size: int, num_layers: int) -> int:
  """Side of the patch-logit map: each stride-2 conv halves, each stride-1 4x4 conv loses 1."""
  return image_size // 2**num_layers - 2


def lpips_convert_command(out: str | os.PathLike = 'lpips_vgg.npz') -> str:
  """The command that makes the LPIPS-VGG .npz (latent.vae.lpips.convert_command is this)."""
  return (f'{_LPIPS_CONVERT.format(out=out)} (vgg16-397923af.pth: {VGG16_URL}; vgg.pth: '
          'lpips/weights/v0.1/vgg.pth inside the `lpips` wheel, used when --lin is left out '
          'and lpips is installed)')


def check_lpips(lpips_weight: float, lpips_weights: str, prefix: str = 'loss') -> None:
  """lpips_weight > 0 needs `lpips_weights`, an existing LPIPS-VGG .npz (checked before compute).

  The weights cannot be downloaded at run time: the user converts them once
  (see latent/vae/lpips.py); without them LPIPS is refused, never silently skipped.
  Reads the file's array names only (its zip directory), not the arrays.
  """
  if lpips_weight < 0:
    raise errors.ConfigError(f'{prefix}.lpips_weight must be >= 0, got {lpips_weight!r}.')
  if lpips_weight == 0:
    return
  key = f'{prefix}.lpips_weights'
  if not lpips_weights:
    raise errors.ConfigError(
        f'{prefix}.lpips_weight={lpips_weight} needs {key}, the LPIPS-VGG weights (.npz), which '
        f'is empty. Make the file with: {lpips_convert_command()}, then set {key} to it (or '
        f'set {prefix}.lpips_weight=0).')
  if not os.path.isfile(lpips_weights):
    raise errors.MissingFileError(
        f'{key}={lpips_weights!r}: no such file (needed by {prefix}.lpips_weight={lpips_weight}). '
        f'Make it with: {lpips_convert_command(lpips_weights)}')
  try:
    with np.load(lpips_weights) as npz:
      keys = list(npz.files)
  except Exception as e:  # pylint: disable=broad-except  # Not a zip / not an .npz.
    raise errors.ConfigError(f'{key}={lpips_weights!r} is not an .npz file ({e}). Make it with: '
                             f'{lpips_convert_command(lpips_weights)}') from e
  missing = sorted(set(LPIPS_KEYS) - set(keys))
  if missing:
    raise errors.ConfigError(f'{key}={lpips_weights!r} lacks the LPIPS-VGG arrays {missing}. Make '
                             f'it with: {lpips_convert_command(lpips_weights)}')


def _adam_ldm() -> ml_collections.ConfigDict:
  """LDM trains both the autoencoder and the discriminator with Adam(b1=0.5, b2=0.9), unclipped."""
  c = optim.get_config()
  c.learning_rate = 1e-4
  c.warmup_steps = 0
  c.b1 = 0.5
  c.b2 = 0.9
  # The losses are sums over pixels (LDM's scale), so gradient norms are large; a norm clip
  # at 1 would fire on every step. Adam normalises the scale anyway.
  c.grad_clip_norm = 0.0
  return c


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.stage = 'vae'             # latent.main dispatches on this: 'vae' is stage 1.
  config.seed = 0
  config.cpu_devices = 0           # >1 splits a CPU-only machine into data-parallel devices.

  config.mesh = mesh.get_config()
  config.params = params.get_config()  # Rules over both nets' paths (autoencoder and D).

  config.data = data.get_config()
  config.data.source = 'folder'
  config.data.path = '../shared/data/anime_faces_mlds96_tagged/images'
  config.data.image_size = 64

  config.vae = v = ml_collections.ConfigDict()
  v.block_out_channels = (128, 256, 512)  # Downsampling factor 2**(levels-1): 4 here.
  v.layers_per_block = 2
  v.latent_channels = 4
  v.norm_groups = 32
  v.dtype = 'float32'              # Compute dtype; 'bfloat16' keeps float32 params.

  config.loss = l = ml_collections.ConfigDict()
  l.rec_loss = 'l1'                # 'l1', 'l2' or 'l1+l2', summed over pixels like LDM.
  l.kl_weight = 1e-6
  l.disc_start = 50_001            # Steps before the GAN terms (and D's updates) start.
  l.disc_weight = 0.5              # Times LDM's adaptive weight.
  l.disc_channels = 64
  l.disc_layers = 3
  l.disc_norm = 'group'            # 'group' or 'none' (no BatchNorm: see vae_loss).
  # LPIPS-VGG perceptual term, at LDM's scale (LDM's kl-f* configs: perceptual_weight 1.0).
  # Optional; > 0 needs lpips_weights, a .npz made once by the user (never downloaded here):
  # python -m latent.lpips convert --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg.npz
  l.lpips_weight = 0.0
  l.lpips_weights = ''             # Path of that .npz; checked by validate.

  config.optim = _adam_ldm()
  config.disc_optim = _adam_ldm()

  config.train = t = ml_collections.ConfigDict()
  t.batch_size = 32                # Global, over all devices and hosts.
  t.num_steps = 100_000
  t.log_every = 100
  t.checkpoint_every = 5_000
  t.keep_checkpoints = 3
  t.async_checkpoint = True
  t.eval_every = 5_000             # Reconstruction PSNR + grid; 0 = never.
  t.num_eval_images = 64           # The data set's last images, held out of training.
  t.scale_factor_images = 2_000    # Training images whose latents set the scale factor.
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  config_lib.check_keys(config, get_config())
  config_lib.check_choice(config.stage, ('vae',), 'stage')
  config_lib.check_positive(config.cpu_devices, 'cpu_devices', allow_zero=True)
  data.validate(config.data)
  optim.validate(config.optim, 'optim')
  optim.validate(config.disc_optim, 'disc_optim')
  mesh.validate(config.mesh)
  params.validate(config.params)

  v, l, t = config.vae, config.loss, config.train
  size = config.data.image_size
  levels = len(v.block_out_channels)
  if levels < 1:
    raise ValueError('vae.block_out_channels must list at least one level.')
  factor = 2**(levels - 1)
  if size % factor:
    raise ValueError(
        f'data.image_size={size} must be divisible by the downsampling factor {factor} '
        f'(2^(levels-1) for vae.block_out_channels={tuple(v.block_out_channels)}).')
  config_lib.check_positive(v.norm_groups, 'vae.norm_groups')
  for c in v.block_out_channels:
    if c % v.norm_groups:
      raise ValueError(f'vae.norm_groups={v.norm_groups} must divide every channel count '
                       f'(vae.block_out_channels has {c}).')
  config_lib.check_positive(v.layers_per_block, 'vae.layers_per_block')
  config_lib.check_positive(v.latent_channels, 'vae.latent_channels')
  config_lib.check_choice(v.dtype, DTYPES, 'vae.dtype')

  config_lib.check_choice(l.rec_loss, REC_LOSSES, 'loss.rec_loss')
  config_lib.check_positive(l.kl_weight, 'loss.kl_weight', allow_zero=True)
  config_lib.check_positive(l.disc_start, 'loss.disc_start', allow_zero=True)
  config_lib.check_positive(l.disc_weight, 'loss.disc_weight', allow_zero=True)
  config_lib.check_positive(l.disc_channels, 'loss.disc_channels')
  config_lib.check_positive(l.disc_layers, 'loss.disc_layers')
  config_lib.check_choice(l.disc_norm, DISC_NORMS, 'loss.disc_norm')
  if discriminator_output_size(size, l.disc_layers) < 1:
    raise ValueError(
        f'loss.disc_layers={l.disc_layers} is too deep for data.image_size={size}: the patch '
        f'discriminator needs image_size / 2^disc_layers >= 3.')
  check_lpips(l.lpips_weight, l.lpips_weights, 'loss')

  for key in ('batch_size', 'num_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints',
              'num_eval_images', 'scale_factor_images'):
    config_lib.check_positive(t[key], f'train.{key}')
  config_lib.check_positive(t.eval_every, 'train.eval_every', allow_zero=True)
