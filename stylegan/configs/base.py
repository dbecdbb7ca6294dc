"""The StyleGAN base config: every key with defaults, and validation before any compute.

The experiment configs beside it (`demo.py`, `anime32.py`, `anime64.py`) start
from `get_config()` and override values; `validate` rejects unknown keys
(typos) and bad values, naming the key, before main touches data or devices.

Imports no model code (only `common`): the choice lists and the augmentation
policy parser live here, and `stylegan.networks` / `stylegan.augment` import
them from here.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections

from common import errors
from common import config as config_lib
from common import data as data_lib
from common import mesh as mesh_lib
from common import optim as optim_lib
from common import params as params_lib

# Per-layer noise of the synthesis network (stylegan.networks checks it at call time).
NOISE_MODES = ('random', 'const', 'none')

# DiffAugment's ops (stylegan.augment implements them).
AUGMENTATIONS = ('color', 'translation', 'cutout')

# Settings a run's checkpoints depend on (common.loop.check_workdir): resuming a
# workdir with other values is an error.
RUN_KEYS = ('data.image_size', 'model')


def parse_policy(policy: str | Sequence[str]) -> tuple[str, ...]:
  """'color,translation,cutout' -> a tuple; '' -> (); unknown names raise ValueError."""
  names = [p.strip() for p in policy.split(',')] if isinstance(policy, str) else list(policy)
  names = tuple(n for n in names if n)
  for n in names:
    if n not in AUGMENTATIONS:
      raise ValueError(f'Unknown augmentation {n!r}; choose from {", ".join(AUGMENTATIONS)}.')
  return names


def _adam_reference() -> ml_collections.ConfigDict:
  """stylegan2-ada-pytorch's Adam: lr 0.0025, betas (0, 0.99), eps 1e-8, no warm-up or clip."""
  o = optim_lib.get_config()
  o.learning_rate = 0.0025
  o.b1, o.b2, o.eps = 0.0, 0.99, 1e-8
  o.warmup_steps = 0
  o.grad_clip_norm = 0.0
  return o


def get_config() -> ml_collections.ConfigDict:
  """Every key a StyleGAN config may set, with stylegan2-ada-pytorch defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = data_lib.get_config()

  c.model = m = ml_collections.ConfigDict()
  m.resolution = 64               # Power of two, 32..256; must equal data.image_size.
  m.z_dim = 512
  m.w_dim = 512
  m.mapping_layers = 8
  m.mapping_lr_multiplier = 0.01
  m.channel_base = 16384          # Channels at resolution r: min(channel_base // r, channel_max).
  m.channel_max = 512
  m.mbstd_group_size = 4
  m.w_avg_beta = 0.995            # Moving average of w, for truncation.

  c.loss = l = ml_collections.ConfigDict()
  l.r1_gamma = 0.0256             # ADA heuristic: 0.0002 * resolution**2 / batch_size.
  l.d_reg_interval = 16           # Lazy R1: every 16 D steps, weighted x16.
  l.pl_weight = 2.0               # 0 turns path-length regularisation off.
  l.pl_decay = 0.01
  l.pl_batch_shrink = 2
  l.g_reg_interval = 4
  l.style_mixing_prob = 0.9

  c.mesh = mesh_lib.get_config()
  c.params = params_lib.get_config()  # Rules over G's and D's parameter paths.

  c.optim = _adam_reference()       # G's optimiser (common.optim keys).
  c.disc_optim = _adam_reference()  # D's.

  c.augment = a = ml_collections.ConfigDict()
  a.policy = 'color,translation,cutout'  # DiffAugment ops; '' turns augmentation off.
  a.p = 0.0                       # Probability per op and image (initial value under ADA).
  a.ada_target = 0.6              # Target E[sign(D(reals))]; 0 keeps p fixed (p=1: DiffAugment).
  a.ada_interval = 4              # Steps between p updates.
  a.ada_kimg = 500                # p can go 0 -> 1 in this many thousand images.

  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 32               # Global, over all devices and hosts.
  t.num_steps = 150_000
  t.ema_kimg = 10.0               # Half-life of G_ema in thousands of images.
  t.ema_rampup = 0.05             # Half-life <= rampup * images seen so far; 0 = no ramp-up.
  t.log_every = 100
  t.sample_every = 2000           # G_ema grid from fixed latents to TensorBoard; 0 = never.
  t.checkpoint_every = 2000
  t.keep_checkpoints = 3
  t.async_checkpoint = True
  t.num_grid_samples = 64         # Fixed latents in the sample grid.

  c.sample = s = ml_collections.ConfigDict()
  s.num_images = 1000             # --mode=sample writes OUT/1.jpg ... OUT/N.jpg.
  s.output_dir = ''               # '' = WORKDIR/samples; the grid goes beside as OUT_grid.png.
  s.psi = 1.0                     # Truncation; 1 = none. Lower: better faces, less variety.
  s.truncation_cutoff = 0         # Truncate only the first ws; 0 = all of them.
  s.noise_mode = 'const'
  s.batch_size = 64
  s.seed = 1
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises KeyError/ValueError naming the offending key."""
  config_lib.check_keys(config, get_config())
  data_lib.validate(config.data)
  m, l, o, a, t, s = (config.model, config.loss, config.optim, config.augment,
                      config.train, config.sample)
  config_lib.check_power_of_two(m.resolution, 'model.resolution')
  config_lib.check_range(m.resolution, 32, 256, 'model.resolution')
  if config.data.image_size != m.resolution:
    raise errors.ConfigError(
        f'data.image_size={config.data.image_size} differs from '
        f'model.resolution={m.resolution}; they must match.')
  for name in ('z_dim', 'w_dim', 'channel_base', 'channel_max', 'mbstd_group_size',
               'mapping_layers', 'mapping_lr_multiplier'):
    config_lib.check_positive(m[name], f'model.{name}')
  config_lib.check_range(m.w_avg_beta, 0.0, 1.0, 'model.w_avg_beta')
  config_lib.check_positive(l.r1_gamma, 'loss.r1_gamma', allow_zero=True)
  config_lib.check_positive(l.pl_weight, 'loss.pl_weight', allow_zero=True)
  for name in ('d_reg_interval', 'g_reg_interval', 'pl_batch_shrink'):
    config_lib.check_positive(l[name], f'loss.{name}')
  config_lib.check_range(l.pl_decay, 0.0, 1.0, 'loss.pl_decay')
  config_lib.check_range(l.style_mixing_prob, 0.0, 1.0, 'loss.style_mixing_prob')
  optim_lib.validate(o, 'optim')
  optim_lib.validate(config.disc_optim, 'disc_optim')
  mesh_lib.validate(config.mesh)
  params_lib.validate(config.params)
  try:
    parse_policy(a.policy)
  except ValueError as e:
    raise errors.ConfigError(f'augment.policy: {e}') from None
  config_lib.check_range(a.p, 0.0, 1.0, 'augment.p')
  config_lib.check_range(a.ada_target, 0.0, 1.0, 'augment.ada_target')
  config_lib.check_positive(a.ada_interval, 'augment.ada_interval')
  config_lib.check_positive(a.ada_kimg, 'augment.ada_kimg')
  for name in ('batch_size', 'num_steps', 'log_every', 'checkpoint_every',
               'keep_checkpoints', 'num_grid_samples'):
    config_lib.check_positive(t[name], f'train.{name}')
  config_lib.check_positive(t.sample_every, 'train.sample_every', allow_zero=True)
  config_lib.check_positive(t.ema_kimg, 'train.ema_kimg', allow_zero=True)
  config_lib.check_positive(t.ema_rampup, 'train.ema_rampup', allow_zero=True)
  if t.batch_size % m.mbstd_group_size:
    raise errors.ConfigError(f'train.batch_size={t.batch_size} must be a multiple of '
                     f'model.mbstd_group_size={m.mbstd_group_size}.')
  if l.pl_weight > 0 and t.batch_size // l.pl_batch_shrink < 1:
    raise errors.ConfigError(f'loss.pl_batch_shrink={l.pl_batch_shrink} leaves no path-length '
                     f'batch from train.batch_size={t.batch_size}.')
  config_lib.check_range(s.psi, -1.0, 2.0, 'sample.psi')
  config_lib.check_positive(s.truncation_cutoff, 'sample.truncation_cutoff', allow_zero=True)
  config_lib.check_choice(s.noise_mode, NOISE_MODES, 'sample.noise_mode')
  config_lib.check_positive(s.batch_size, 'sample.batch_size')
  config_lib.check_positive(s.num_images, 'sample.num_images')
