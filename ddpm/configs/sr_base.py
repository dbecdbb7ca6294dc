"""Every key a super-resolution config (ddpm/sr.py) may set: ddpm's (but sample.num_images and
sample.progressive: --mode=upscale upscales every input), plus `sr` and two sample keys.

SR3 (Saharia et al. 2021): a pixel U-Net denoises the high-resolution image x_t given the
low-resolution image, bicubic-upsampled to data.image_size and concatenated on the channels.
As in Stable Diffusion's x4 upscaler (which noises the low-resolution image itself; here its
upsampled copy), the conditioning is noised to a random level s
during training (noise-conditioning augmentation, Ho et al. 2021's cascaded models) and s
is embedded like a timestep and added to the time embedding; sampling uses the fixed small
level sample.noise_level.

Imports no model code (tests/test_configs.py). `is_sr` tells ddpm/main.py which base a
config belongs to.
"""

import math

import ml_collections

from common import config as config_lib
from ddpm.configs import default

DOWNSAMPLES = ('box', 'bicubic')   # ddpm.sr.downsample's methods.

# ddpm's, plus what defines the task the checkpoints were trained for.
RUN_KEYS = default.RUN_KEYS + ('sr.factors', 'sr.downsample', 'sr.noise_schedule')


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.sr = sr = ml_collections.ConfigDict()
  sr.factors = (2, 4)              # Downsampling factors trained; one is drawn per example, and
                                   # the low-res copy is always upsampled to data.image_size, so
                                   # one model serves every factor listed.
  sr.downsample = 'box'            # How training makes the low-res copy: 'box' (area average)
                                   # or 'bicubic' (antialiased, as PIL's resize).
  sr.noise_schedule = 'linear'     # Schedule of the augmentation noise (SD x4's low_res_scheduler:
                                   # linear over diffusion.num_timesteps steps).
  sr.max_noise_level = 150         # s ~ U{0..max} during training (SD x4: 350).
  sr.crop_size = 0                 # > 0: train on random crops of this size (the U-Net is
                                   # convolutional; keep attention off), 0 = whole images.
  sr.holdout = 500                 # The data's last N images (sorted file names) are never
                                   # trained on: benchmarks/bench_sr.py measures on them.

  s = config.sample
  # --mode=upscale writes one image per input and no figure: ddpm's sample.num_images and
  # sample.progressive (of --mode=sample) are no keys here, so setting one is an error.
  del s['num_images'], s['progressive']
  s.input = ''                     # --mode=upscale: the folder of low-resolution images.
  s.noise_level = 20               # s at sampling (SD x4's default 20).
  s.output_dir = ''                # '' = WORKDIR/upscaled (same file names as the inputs).
  return config


def is_sr(config) -> bool:
  return 'sr' in config


def validate(config: ml_collections.ConfigDict) -> None:
  config_lib.check_keys(config, get_config())
  default.validate_values(config)
  sr, size = config.sr, config.data.image_size
  if not sr.factors:
    raise ValueError('sr.factors must list at least one downsampling factor, e.g. (2, 4).')
  for f in sr.factors:
    if not isinstance(f, int) or f < 2 or size % f:
      raise ValueError(f'sr.factors={tuple(sr.factors)}: each factor must be an integer >= 2 '
                       f'dividing data.image_size={size}, got {f!r}.')
  if len(set(sr.factors)) != len(sr.factors):
    raise ValueError(f'sr.factors={tuple(sr.factors)} lists a factor twice.')
  config_lib.check_choice(sr.downsample, DOWNSAMPLES, 'sr.downsample')
  config_lib.check_choice(sr.noise_schedule, default.SCHEDULES, 'sr.noise_schedule')
  top = config.diffusion.num_timesteps - 1
  config_lib.check_range(sr.max_noise_level, 0, top, 'sr.max_noise_level')
  config_lib.check_range(config.sample.noise_level, 0, top, 'sample.noise_level')
  config_lib.check_positive(sr.holdout, 'sr.holdout', allow_zero=True)
  if sr.crop_size:
    levels = len(config.model.block_out_channels)
    multiple = math.lcm(2**(levels - 1), *sr.factors)
    if sr.crop_size % multiple or not 0 < sr.crop_size <= size:
      raise ValueError(f'sr.crop_size={sr.crop_size} must be a multiple of {multiple} (the '
                       "U-Net's downsampling and every factor of sr.factors), at most "
                       f'data.image_size={size}.')
    m = config.model
    if sr.crop_size < size and (m.attention_resolutions or m.mid_attention):
      raise ValueError('sr.crop_size trains on crops smaller than the images the model '
                       'upscales: set model.attention_resolutions=() and '
                       'model.mid_attention=False (attention over a crop does not carry over '
                       'to the whole image).')
