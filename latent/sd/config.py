"""Stable Diffusion folders' configs as our modules' settings, read without any weights.

diffusers' `UNet2DConditionModel` config.json <-> `latent.ldm.unet.ConditionalUNet`
(`unet_from_config`, `unet_diffusers_config`; ControlNet folders reuse both), a scheduler's
scheduler_config.json -> `ddpm.schedules.Schedule` + sampler options, and the checks that
name what is missing or unsupported before a large file is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from common import errors
from ddpm import schedules
from latent.ldm.unet import ConditionalUNet

SINGLE_FILE = ('.ckpt', '.safetensors', '.pt', '.pth')  # The original SD checkpoint formats.
PREDICTIONS = {'epsilon': 'eps', 'v_prediction': 'v', 'sample': 'x0'}


def read_json(path: Path) -> dict:
  if not path.is_file():
    raise errors.MissingFileError(
        f'{path} not found: expected a diffusers Stable Diffusion pipeline folder '
        '(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), as '
        'StableDiffusionPipeline.save_pretrained writes it. Download one on a machine with '
        'network access, e.g. huggingface-cli download <repo> --local-dir DIR.')
  return json.loads(path.read_text())


def unet_from_config(cfg: dict, dtype=jnp.float32) -> ConditionalUNet:
  """Our ConditionalUNet for a diffusers UNet2DConditionModel config.json (SD 1.x / 2.x)."""
  unsupported = {k: cfg.get(k) for k in ('addition_embed_type', 'class_embed_type',
                                         'encoder_hid_dim', 'time_cond_proj_dim')
                 if cfg.get(k) is not None}
  if cfg.get('only_cross_attention') not in (None, False) or cfg.get('dual_cross_attention'):
    unsupported['cross attention'] = 'only/dual'
  if not cfg.get('flip_sin_to_cos', True) or cfg.get('freq_shift', 0):
    unsupported['time embedding'] = (cfg.get('flip_sin_to_cos'), cfg.get('freq_shift'))
  if cfg.get('mid_block_type', 'UNetMidBlock2DCrossAttn') != 'UNetMidBlock2DCrossAttn':
    unsupported['mid_block_type'] = cfg['mid_block_type']
  depth = cfg.get('transformer_layers_per_block', 1)
  if not isinstance(depth, int):
    depth = set(depth) if len(set(depth)) == 1 else depth
    depth = next(iter(depth)) if isinstance(depth, set) else depth
  if not isinstance(depth, int):
    unsupported['transformer_layers_per_block'] = depth
  if unsupported:
    raise errors.ConfigError(f'The UNet config uses what this port does not have (SDXL and '
                             f'other variants): {unsupported}.')
  channels = tuple(cfg['block_out_channels'])
  size = cfg['sample_size']
  attn = [t.startswith('CrossAttn') for t in cfg['down_block_types']]
  # diffusers' attention_head_dim is the number of heads (a historical name) unless
  # num_attention_heads is given.
  heads = cfg.get('num_attention_heads') or cfg.get('attention_head_dim', 8)
  heads = [heads] * len(channels) if isinstance(heads, int) else list(heads)
  head_dims = {c // h for c, h, a in zip(channels, heads, attn) if a}
  kw = {}
  if len(set(h for h, a in zip(heads, attn) if a)) == 1:
    kw['num_heads'] = next(h for h, a in zip(heads, attn) if a)
  elif len(head_dims) == 1:
    kw['head_dim'] = head_dims.pop()
  else:
    raise errors.ConfigError(f'attention heads {heads} for channels {channels}: neither the '
                             'same count nor the same width at every level.')
  return ConditionalUNet(
      sample_size=size, in_channels=cfg['in_channels'], out_channels=cfg['out_channels'],
      block_out_channels=channels, layers_per_block=cfg['layers_per_block'],
      attention_resolutions=tuple(size // 2**i for i, a in enumerate(attn) if a),
      norm_groups=cfg.get('norm_num_groups', 32), norm_eps=cfg.get('norm_eps', 1e-5),
      transformer_depth=depth, linear_projection=cfg.get('use_linear_projection', False),
      dtype=dtype, **kw)


def unet_diffusers_config(unet: ConditionalUNet, cross_attention_dim: int) -> dict:
  """The UNet2DConditionModel config of our ConditionalUNet (the inverse of unet_from_config)."""
  levels = unet.attention_levels()
  chans = tuple(unet.block_out_channels)
  heads = unet.num_heads or [c // (unet.head_dim or c) for c in chans]
  if not unet.mid_attention:
    raise errors.ConfigError('UNet2DConditionModel always has mid-block attention; this U-Net '
                             'has none (model.mid_attention=False).')
  return dict(
      sample_size=unet.sample_size, in_channels=unet.in_channels, out_channels=unet.out_channels,
      block_out_channels=chans, layers_per_block=unet.layers_per_block,
      down_block_types=tuple('CrossAttnDownBlock2D' if a else 'DownBlock2D' for a in levels),
      up_block_types=tuple('CrossAttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(levels)),
      mid_block_type='UNetMidBlock2DCrossAttn', norm_num_groups=unet.norm_groups,
      norm_eps=unet.norm_eps, cross_attention_dim=cross_attention_dim, attention_head_dim=heads,
      use_linear_projection=unet.linear_projection,
      transformer_layers_per_block=unet.transformer_depth)


def schedule_from_config(cfg: dict) -> tuple[schedules.Schedule, dict]:
  """(Schedule, sampler options) of a diffusers scheduler_config.json."""
  T = cfg.get('num_train_timesteps', 1000)
  start, end = cfg.get('beta_start', 0.0001), cfg.get('beta_end', 0.02)
  kind = cfg.get('beta_schedule', 'linear')
  if cfg.get('trained_betas') is not None:
    betas = np.asarray(cfg['trained_betas'], np.float64)
  elif kind == 'scaled_linear':
    betas = schedules.scaled_linear_betas(T, start, end)
  elif kind == 'linear':
    betas = np.linspace(start, end, T, dtype=np.float64)
  elif kind == 'squaredcos_cap_v2':
    betas = schedules.get_betas('cosine', T)
  else:
    raise errors.ConfigError(f'scheduler beta_schedule={kind!r} is not supported.')
  prediction = cfg.get('prediction_type', 'epsilon')
  if prediction not in PREDICTIONS:
    raise errors.ConfigError(f'scheduler prediction_type={prediction!r} is not supported.')
  schedule = schedules.from_betas(betas)
  options = dict(prediction=PREDICTIONS[prediction],
                 spacing=cfg.get('timestep_spacing', 'leading'),
                 steps_offset=cfg.get('steps_offset', 0),
                 clip_x0=bool(cfg.get('clip_sample', False)),
                 final_alpha_cumprod=1.0 if cfg.get('set_alpha_to_one', True)
                 else float(schedule.alphas_cumprod[0]))
  return schedule, options


def refuse_single_file(path: Path) -> None:
  """A one-line error for the original single-file checkpoints (a .ckpt, or a folder of them)."""
  if path.is_file():
    single = path if path.suffix in SINGLE_FILE else None
    if single is None:
      raise errors.ConfigError(f'{path} is a file; pipeline must name a diffusers pipeline '
                               'folder (the one holding model_index.json).')
  elif (path / 'model_index.json').is_file() or (path / 'config.json').is_file():
    return  # A pipeline folder (or one component of it: read_json names what is missing).
  else:
    single = next((p for p in sorted(path.glob('*')) if p.suffix in SINGLE_FILE), None)
  if single is not None:
    raise errors.ConfigError(
        f'{single} is a single-file checkpoint (the original Stable Diffusion format); this '
        'loader reads diffusers pipeline folders. Convert it once with diffusers: '
        'StableDiffusionPipeline.from_single_file(FILE).save_pretrained(DIR) (or its script '
        'scripts/convert_original_stable_diffusion_to_diffusers.py --checkpoint_path FILE '
        '--dump_path DIR), then pass DIR.')
