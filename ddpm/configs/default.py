"""Every key a ddpm config may set, with defaults; experiment configs override these.

`validate` runs before any data is read or any array is made, and names the
offending key.

Imports no model code (only `common`): the choice lists below are defined here;
`ddpm.diffusion` and `ddpm.samplers` import PREDICTIONS and SPACINGS from here, and
the registries `ddpm.samplers.SAMPLERS` / `ddpm.schedules.SCHEDULES` are keyed by
exactly these names (tests/test_configs.py checks that they agree).
"""

import ml_collections

from common import augment, data, mesh, optim, params
from common import config as config_lib

DTYPES = ('float32', 'bfloat16')
SCHEDULES = ('linear', 'scaled_linear', 'cosine', 'sigmoid')  # ddpm.schedules.SCHEDULES' keys.
PREDICTIONS = ('eps', 'x0', 'v')                               # What the network predicts.
SIGMA_SAMPLERS = ('euler', 'euler_ancestral', 'heun', 'dpmpp_2m_karras')  # Step in sigma.
SAMPLERS = ('ddpm', 'ddim', 'dpm_solver', 'unipc') + SIGMA_SAMPLERS     # ddpm.samplers.SAMPLERS' keys.
SPACINGS = ('leading', 'trailing', 'linspace')                 # Inference timestep spacings.

# Settings a run's checkpoints depend on: resuming a workdir with other values is an
# error (common.loop.check_workdir). Prefixes cover their sub-keys.
RUN_KEYS = ('data.image_size', 'model.block_out_channels', 'model.layers_per_block',
            'model.attention_resolutions', 'model.head_dim', 'model.mid_attention',
            'model.norm_groups', 'diffusion.schedule', 'diffusion.num_timesteps',
            'diffusion.prediction')


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.cpu_devices = 0           # >1 splits a CPU-only machine into that many data-parallel
                                   # devices, to try sharding without an accelerator; 0 = JAX's
                                   # default. XLA's in-process CPU all-reduce can stall when the
                                   # devices outnumber idle cores, so runs that matter keep 0.

  config.mesh = mesh.get_config()     # mesh.fsdp=N shards params and optimiser state N ways.
  config.params = params.get_config() # Trainable/frozen, lr multipliers, decay, sharding rules.

  config.data = data.get_config()
  config.augment = augment.get_config()

  config.model = m = ml_collections.ConfigDict()
  m.block_out_channels = (128, 256, 256, 256)
  m.layers_per_block = 2
  m.attention_resolutions = (16,)  # Feature-map sizes that get self-attention.
  m.head_dim = 0                   # Channels per attention head; 0 = one head.
  m.mid_attention = True
  m.norm_groups = 32
  m.dropout = 0.0
  m.dtype = 'float32'              # Compute dtype; 'bfloat16' keeps float32 params.
  m.remat = False                  # Recompute block activations in the backward pass (memory).

  config.diffusion = d = ml_collections.ConfigDict()
  d.schedule = 'linear'
  d.num_timesteps = 1000
  d.prediction = 'eps'
  d.min_snr_gamma = 0.0            # 0 = the DDPM "simple" loss; 5 is the paper's choice.

  config.optim = optim.get_config()

  config.train = t = ml_collections.ConfigDict()
  t.batch_size = 128               # Global, over all devices and hosts.
  t.grad_accum_steps = 1           # Split each batch into this many sequential micro-batches:
                                   # the same update, dropout's masks too (drawn per example).
  t.num_steps = 100_000
  t.log_every = 100
  t.checkpoint_every = 5_000
  t.keep_checkpoints = 3
  t.async_checkpoint = True
  t.sample_every = 10_000          # EMA sample grids to TensorBoard; 0 = never.
  t.num_grid_samples = 16
  t.ema_decay = 0.9999
  t.ema_every = 1                  # Update the EMA every N steps.
  t.ema_warmup = True

  config.sample = s = ml_collections.ConfigDict()
  s.sampler = 'ddim'
  s.num_steps = 50                 # ddim / dpm_solver / unipc / ...; ddpm always runs all T.
  s.eta = 0.0
  s.karras_sigmas = False          # euler / heun: Karras et al.'s sigma spacing.
  s.spacing = 'leading'
  s.clip_x0 = True
  s.ddpm_variance = 'fixed_small'
  s.num_images = 1000
  s.batch_size = 250
  s.output_dir = ''                # '' = WORKDIR/samples.
  s.use_ema = True
  s.seed = 1
  s.progressive = True             # Also write progressive.png (5 samples x 10 stages).
  s.adapters = ()                  # LoRA files (PEFT/diffusers format) as 'PATH[:STRENGTH]',
                                   # folded into the weights before sampling.
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  config_lib.check_keys(config, get_config())
  validate_values(config)


def validate_values(config: ml_collections.ConfigDict) -> None:
  """`validate` without the key check (ddpm/configs/sr_base.py holds more keys)."""
  data.validate(config.data)
  augment.validate(config.augment)
  optim.validate(config.optim)
  mesh.validate(config.mesh)
  params.validate(config.params)
  config_lib.check_positive(config.cpu_devices, 'cpu_devices', allow_zero=True)
  validate_model(config.model, config.data.image_size)
  validate_diffusion(config.diffusion)
  validate_train(config.train)
  validate_sample(config.sample, config.diffusion)
  if 'num_images' in config.sample:  # Not a key of the super-resolution configs (sr_base.py).
    config_lib.check_positive(config.sample.num_images, 'sample.num_images')


def validate_model(m: ml_collections.ConfigDict, size: int, size_name: str = 'data.image_size'):
  """The U-Net keys for inputs of `size` (pixels here, latents in latent/)."""
  levels = len(m.block_out_channels)
  if levels < 1:
    raise ValueError('model.block_out_channels must list at least one level.')
  if size % 2**(levels - 1):
    raise ValueError(
        f'{size_name}={size} must be divisible by 2^(levels-1)={2**(levels - 1)} for '
        f'model.block_out_channels={tuple(m.block_out_channels)}.')
  resolutions = [size // 2**i for i in range(levels)]
  for r in m.attention_resolutions:
    if r not in resolutions:
      raise ValueError(f'model.attention_resolutions has {r}, not a feature-map size of this '
                       f'model ({size_name}={size}): {resolutions}.')
  for c in m.block_out_channels:
    if c % m.norm_groups:
      raise ValueError(f'model.norm_groups={m.norm_groups} must divide every channel count '
                       f'(model.block_out_channels has {c}).')
    if m.head_dim and c % m.head_dim:
      raise ValueError(f'model.head_dim={m.head_dim} must divide every channel count ({c}).')
  config_lib.check_positive(m.layers_per_block, 'model.layers_per_block')
  config_lib.check_range(m.dropout, 0.0, 1.0, 'model.dropout')
  config_lib.check_choice(m.dtype, DTYPES, 'model.dtype')


def validate_diffusion(d: ml_collections.ConfigDict) -> None:
  config_lib.check_choice(d.schedule, SCHEDULES, 'diffusion.schedule')
  config_lib.check_positive(d.num_timesteps, 'diffusion.num_timesteps')
  config_lib.check_choice(d.prediction, PREDICTIONS, 'diffusion.prediction')
  config_lib.check_positive(d.min_snr_gamma, 'diffusion.min_snr_gamma', allow_zero=True)


def validate_train(t: ml_collections.ConfigDict) -> None:
  for key in ('batch_size', 'num_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints',
              'ema_every', 'num_grid_samples'):
    config_lib.check_positive(t[key], f'train.{key}')
  config_lib.check_positive(t.sample_every, 'train.sample_every', allow_zero=True)
  config_lib.check_range(t.ema_decay, 0.0, 1.0, 'train.ema_decay')
  config_lib.check_positive(t.grad_accum_steps, 'train.grad_accum_steps')
  if t.batch_size % t.grad_accum_steps:
    raise ValueError(f'train.batch_size={t.batch_size} is not divisible by '
                     f'train.grad_accum_steps={t.grad_accum_steps}.')


def validate_sample(s: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> None:
  for i, spec in enumerate(s.adapters):
    config_lib.parse_weighted_path(spec, f'sample.adapters[{i}]')
  config_lib.check_choice(s.sampler, SAMPLERS, 'sample.sampler')
  if s.karras_sigmas and s.sampler not in ('euler', 'heun'):
    raise ValueError(f'sample.karras_sigmas applies to the euler and heun samplers, not '
                     f'{s.sampler!r} (dpmpp_2m_karras always uses them).')
  config_lib.check_choice(s.spacing, SPACINGS, 'sample.spacing')
  config_lib.check_choice(s.ddpm_variance, ('fixed_small', 'fixed_large'), 'sample.ddpm_variance')
  config_lib.check_range(s.eta, 0.0, 1.0, 'sample.eta')
  if not 1 <= s.num_steps <= d.num_timesteps:
    raise ValueError(f'sample.num_steps={s.num_steps} must be in [1, diffusion.num_timesteps='
                     f'{d.num_timesteps}].')
  config_lib.check_positive(s.batch_size, 'sample.batch_size')
