"""Every key of a latent/ stage-1 (autoencoder) config, with defaults; experiment configs override these.

`validate` runs before any data is read or any array is made, and names the
offending key.
"""

import ml_collections

from common import data, optim
from common import config as config_lib
from latent import vae_loss

DTYPES = ('float32', 'bfloat16')


# Settings a run's checkpoints depend on (common.loop.check_workdir): resuming with other
# values is an error. Stage 2 also rebuilds the autoencoder from them.
RUN_KEYS = ('data.image_size', 'vae', 'loss.disc_channels', 'loss.disc_layers',
            'loss.disc_norm')


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

  config_lib.check_choice(l.rec_loss, vae_loss.REC_LOSSES, 'loss.rec_loss')
  config_lib.check_positive(l.kl_weight, 'loss.kl_weight', allow_zero=True)
  config_lib.check_positive(l.disc_start, 'loss.disc_start', allow_zero=True)
  config_lib.check_positive(l.disc_weight, 'loss.disc_weight', allow_zero=True)
  config_lib.check_positive(l.disc_channels, 'loss.disc_channels')
  config_lib.check_positive(l.disc_layers, 'loss.disc_layers')
  config_lib.check_choice(l.disc_norm, vae_loss.DISC_NORMS, 'loss.disc_norm')
  if vae_loss.discriminator_output_size(size, l.disc_layers) < 1:
    raise ValueError(
        f'loss.disc_layers={l.disc_layers} is too deep for data.image_size={size}: the patch '
        f'discriminator needs image_size / 2^disc_layers >= 3.')
  vae_loss.check_lpips(l.lpips_weight, l.lpips_weights, 'loss')

  for key in ('batch_size', 'num_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints',
              'num_eval_images', 'scale_factor_images'):
    config_lib.check_positive(t[key], f'train.{key}')
  config_lib.check_positive(t.eval_every, 'train.eval_every', allow_zero=True)
