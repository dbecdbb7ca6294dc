"""Moving U-Net weights between diffusers' UNet2DModel (PyTorch) and ddpm.models.UNet.

Flax module paths are diffusers' keys with each ``.N`` index folded into the
name (``down_blocks.1.resnets.0`` <-> ``down_blocks_1.resnets_0``), so the
mapping is mechanical: transpose conv and linear kernels, rename GroupNorm's
weight to scale.

A diffusers checkpoint folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
is read with safetensors' numpy API: no torch needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import flax
import numpy as np

from common import errors
from common import params as params_lib
from ddpm import models


def _flax_key(torch_key: str) -> str:
  return re.sub(r'\.(\d+)', r'_\1', torch_key)


def params_from_torch_state_dict(state_dict: dict[str, np.ndarray], reference_params) -> dict:
  """diffusers UNet2DModel state dict (numpy arrays) -> Flax params shaped like `reference_params`."""
  by_module = {}
  for key in state_dict:
    module, leaf = key.rsplit('.', 1)
    by_module[(_flax_key(module), leaf)] = key
  out, used = {}, set()
  for path, ref in flax.traverse_util.flatten_dict(reference_params).items():
    module, leaf = '.'.join(path[:-1]), path[-1]
    torch_leaf = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}[leaf]
    key = by_module.get((module, torch_leaf))
    if key is None:
      raise KeyError(f'No diffusers weight for Flax parameter {"/".join(path)}.')
    w = np.asarray(state_dict[key], np.float32)
    if leaf == 'kernel':
      w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T  # OIHW -> HWIO; (out, in) -> (in, out).
    if w.shape != ref.shape:
      raise ValueError(f'{key}: shape {w.shape} does not fit {"/".join(path)} {ref.shape}.')
    out[path] = w
    used.add(key)
  unused = sorted(set(state_dict) - used)
  if unused:
    raise KeyError(f'diffusers weights with no Flax counterpart: {unused[:5]}...')
  return flax.traverse_util.unflatten_dict(out)


def params_to_torch_state_dict(params) -> dict[str, np.ndarray]:
  """Flax params -> the diffusers state dict (numpy) of the same U-Net (or autoencoder):
  the inverse of `params_from_torch_state_dict`, for saving our models where diffusers
  opens them (`load_state_dict`, `save_pretrained`)."""
  out = {}
  for path, w in flax.traverse_util.flatten_dict(params).items():
    leaf = path[-1]
    if leaf not in ('kernel', 'scale', 'embedding', 'bias'):
      raise KeyError(f'{"/".join(path)} has no diffusers counterpart (a LoRA adapter? merge it '
                     'first with common.lora.merged).')
    w = np.asarray(w, np.float32)
    if leaf == 'kernel':
      w = w.transpose(3, 2, 0, 1) if w.ndim == 4 else w.T  # HWIO -> OIHW; (in, out) -> (out, in).
    name = params_lib.torch_module_name(path[:-1])
    out[f'{name}.{"bias" if leaf == "bias" else "weight"}'] = np.ascontiguousarray(w)
  return out


def save_diffusers_folder(folder: str | Path, class_name: str, config: dict, params) -> Path:
  """A folder diffusers' `<class_name>.from_pretrained` opens: config.json + safetensors."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  record = {'_class_name': class_name, '_diffusers_version': '0.30.0', **config}
  (folder / 'config.json').write_text(json.dumps(record, indent=2, default=list) + '\n')
  save_file(params_to_torch_state_dict(params), str(folder / 'diffusion_pytorch_model.safetensors'),
            metadata={'format': 'pt'})
  return folder


def diffusers_config(unet: models.UNet) -> dict:
  """The UNet2DModel constructor arguments of the same architecture."""
  attn = unet.attention_levels()
  down = ['AttnDownBlock2D' if a else 'DownBlock2D' for a in attn]
  up = ['AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attn)]
  return dict(
      sample_size=unet.sample_size, in_channels=unet.in_channels, out_channels=unet.out_channels,
      block_out_channels=tuple(unet.block_out_channels), layers_per_block=unet.layers_per_block,
      down_block_types=tuple(down), up_block_types=tuple(up),
      attention_head_dim=unet.head_dim or None, add_attention=unet.mid_attention,
      norm_num_groups=unet.norm_groups, norm_eps=unet.norm_eps, dropout=unet.dropout)


def read_safetensors(folder: str | Path, stem: str, hint: str) -> dict[str, np.ndarray]:
  """folder/<stem>.safetensors as numpy arrays (no torch); `hint` ends the not-found error.

  A folder with only the half-precision variant (save_pretrained(variant='fp16') writes
  <stem>.fp16.safetensors, as many hub repositories ship) is read too, upcast to float32.
  """
  folder = Path(folder)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  for path in (folder / f'{stem}.safetensors', folder / f'{stem}.fp16.safetensors'):
    if path.is_file():
      try:
        state = load_file(str(path))
      except Exception as e:  # safetensors raises its own error types (truncated, bf16, ...).
        raise errors.DataError(f'{path} cannot be read as safetensors: {e}') from None
      return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in state.items()}
  wanted = folder / f'{stem}.safetensors'
  pickles = sorted(p.name for p in folder.glob('*.bin'))
  if pickles:
    raise errors.MissingFileError(
        f'{wanted} not found, only PyTorch pickle weights ({pickles[0]}), which this loader does '
        'not unpickle: re-save them as safetensors with diffusers, e.g. '
        'DiffusionPipeline.from_pretrained(DIR).save_pretrained(NEW_DIR).')
  raise errors.MissingFileError(f'{wanted} not found: {hint}')


def load_diffusers_unet(folder: str | Path, reference_params) -> dict:
  """Reads a diffusers UNet2DModel folder saved with save_pretrained()."""
  state = read_safetensors(
      folder, 'diffusion_pytorch_model',
      'expected a diffusers UNet2DModel folder written by save_pretrained() (config.json + '
      'diffusion_pytorch_model.safetensors). Download it on a machine with network access '
      '(e.g. huggingface-cli download google/ddpm-cifar10-32 --include "unet/*") and pass the '
      'unet folder.')
  return params_from_torch_state_dict(state, reference_params)


def unet_from_diffusers_config(folder: str | Path, **overrides) -> models.UNet:
  """Builds the Flax UNet described by a diffusers config.json."""
  cfg = json.loads((Path(folder) / 'config.json').read_text())
  attn_res = tuple(cfg['sample_size'] // 2**i for i, b in enumerate(cfg['down_block_types'])
                   if b.startswith('Attn'))
  kw = dict(sample_size=cfg['sample_size'], in_channels=cfg['in_channels'],
            out_channels=cfg['out_channels'], block_out_channels=tuple(cfg['block_out_channels']),
            layers_per_block=cfg['layers_per_block'], attention_resolutions=attn_res,
            head_dim=cfg.get('attention_head_dim') or 0, mid_attention=cfg.get('add_attention', True),
            norm_groups=cfg.get('norm_num_groups', 32), norm_eps=cfg.get('norm_eps', 1e-5),
            dropout=cfg.get('dropout', 0.0))
  kw.update(overrides)
  return models.UNet(**kw)
