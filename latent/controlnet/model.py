"""ControlNet (Zhang & Agrawala 2023): a trainable copy of the U-Net's encoder steered by an image.

`ControlNet` is diffusers' `ControlNetModel` block for block (same module names, so
`ddpm.convert` moves weights both ways): the conditional U-Net's conv_in, time embedding,
down blocks and mid block, plus

  controlnet_cond_embedding   conv stack from the control image down to the latent grid
                              (its conv_out zero-initialised)
  controlnet_down_blocks_k    one zero-initialised 1x1 conv per skip connection
  controlnet_mid_block        one for the mid block's output

Its outputs (times `scale`) are added to the frozen U-Net's skip connections and mid-block
output (`ddpm.models.UNet(control=...)`), so a fresh ControlNet, its encoder copied from
the base (`init_params`), leaves the base model's output exactly unchanged.

Control images are float [B, H, W, C] in [0, 1] at the pixel resolution, as diffusers'
pipelines feed them (`as_input`); `latent.controlnet.maps` makes them from any picture
(Canny edges, scribbles), so any image folder is training data.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import errors
from ddpm import convert
from ddpm.models import conv
from latent.configs.ldm_base import SD_EMBEDDING_CHANNELS
from latent.ldm.unet import ConditionalUNet
from latent.sd import config as sd_config

FOLDER = 'controlnet'  # A run's ControlNet as a diffusers ControlNetModel folder.
SHARED = ('conv_in', 'time_embedding', 'down_blocks_', 'mid_block.')  # Copied from the U-Net.


class ConditioningEmbedding(nn.Module):
  """Control image -> features on the latent grid: conv_in, pairs of (3x3, 3x3 stride 2)
  convs, SiLU after each, and a zero-initialised conv_out (diffusers'
  ControlNetConditioningEmbedding)."""
  features: int
  block_out_channels: Sequence[int] = SD_EMBEDDING_CHANNELS
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    chans = tuple(self.block_out_channels)
    x = nn.silu(conv(chans[0], 'conv_in', self.dtype)(x.astype(self.dtype)))
    for i in range(len(chans) - 1):
      x = nn.silu(conv(chans[i], f'blocks_{2 * i}', self.dtype)(x))
      x = nn.silu(conv(chans[i + 1], f'blocks_{2 * i + 1}', self.dtype, stride=2)(x))
    return nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                   kernel_init=nn.initializers.zeros, name='conv_out')(x)


def residual_scales(n: int, scale, guess_mode: bool) -> list:
  """The factor of each of the n residuals (the mid block's last): `scale`, or in guess mode
  diffusers' logspace(-1, 0, n) * scale (weak at the shallow skips, full at the mid block)."""
  if guess_mode:
    return [scale * float(s) for s in np.logspace(-1, 0, n)]
  return [scale] * n


def for_guidance(control, scale, guess_mode: bool):
  """(control, scale) for guidance's [conditional; unconditional] batch: the control images
  twice, and in guess mode a scale of 0 on the unconditional half (diffusers' pipeline runs
  the ControlNet on the conditional half only and adds nothing to the other)."""
  b = control.shape[0]
  scale = jnp.asarray(scale, jnp.float32)
  if guess_mode:
    scale = jnp.concatenate([jnp.full((b,), scale), jnp.zeros((b,))])
  return jnp.concatenate([control, control]), scale


class ControlNet(ConditionalUNet):
  """The conditional U-Net's encoder, copied, with the conditioning embedding and zero convs.

  `__call__` returns (down residuals, mid residual) for `UNet(control=...)`. `scale` is
  diffusers' conditioning_scale: a number, or [B] (per example, e.g. 0 for guidance's
  unconditional half in guess mode).
  """
  conditioning_channels: int = 3
  conditioning_embedding_out_channels: Sequence[int] = SD_EMBEDDING_CHANNELS

  @property
  def control_size(self) -> int:
    """The control image's side: the latent grid's times the embedding's downsampling."""
    return self.sample_size * 2 ** (len(self.conditioning_embedding_out_channels) - 1)

  @nn.compact
  def __call__(self, x, t, control, context=None, context_mask=None, scale=1.0,
               guess_mode: bool = False, train: bool = False):
    want = (self.control_size, self.control_size, self.conditioning_channels)
    if control.ndim != 4 or control.shape[1:] != want:
      raise ValueError(f'ControlNet expects control images [B, {want[0]}, {want[1]}, {want[2]}], '
                       f'got {control.shape}.')
    h, temb = self.stem(x, t, train)
    h = h + ConditioningEmbedding(self.block_out_channels[0],
                                  tuple(self.conditioning_embedding_out_channels), self.dtype,
                                  name='controlnet_cond_embedding')(control)
    h, skips = self.encode(h, temb, train, context, context_mask)
    zero_conv = lambda name, c: nn.Conv(c, (1, 1), dtype=self.dtype, name=name,
                                        kernel_init=nn.initializers.zeros)
    down = [zero_conv(f'controlnet_down_blocks_{k}', s.shape[-1])(s) for k, s in enumerate(skips)]
    mid = zero_conv('controlnet_mid_block', h.shape[-1])(h)
    scales = residual_scales(len(down) + 1, jnp.asarray(scale, jnp.float32), guess_mode)
    per_example = lambda s: jnp.reshape(s, (-1, 1, 1, 1)) if jnp.ndim(s) else s
    down = [(d * per_example(s)).astype(jnp.float32) for d, s in zip(down, scales)]
    return down, (mid * per_example(scales[-1])).astype(jnp.float32)


def from_unet(unet: ConditionalUNet, conditioning_channels: int = 3,
              embedding_channels: Sequence[int] = SD_EMBEDDING_CHANNELS, name='controlnet'):
  """The ControlNet of a conditional U-Net's architecture (diffusers' ControlNetModel.from_unet)."""
  fields = {f.name: getattr(unet, f.name) for f in dataclasses.fields(unet)
            if f.init and f.name not in ('parent', 'name')}
  return ControlNet(**fields, conditioning_channels=conditioning_channels,
                    conditioning_embedding_out_channels=tuple(embedding_channels), name=name)


def dummy_inputs(controlnet: ControlNet, context_width: int, context_length: int = 1):
  """(z, t, control, context) of batch 1, for init and eval_shape."""
  u = controlnet
  return (jnp.zeros((1, u.sample_size, u.sample_size, u.in_channels)), jnp.zeros((1,), jnp.int32),
          jnp.zeros((1, u.control_size, u.control_size, u.conditioning_channels)),
          jnp.zeros((1, context_length, context_width)))


def init_params(controlnet: ControlNet, unet_params, rng, context_width: int,
                context_length: int = 1):
  """A fresh ControlNet's parameters: the encoder copied from the base U-Net's (conv_in,
  time embedding, down and mid blocks), the conditioning embedding random but for its
  zero conv_out, and the zero convs zero, so the controlled model starts as the base."""
  params = jax.jit(controlnet.init)(
      rng, *dummy_inputs(controlnet, context_width, context_length))['params']
  params = flax.core.unfreeze(params)
  for key in params:
    if key.startswith(SHARED):
      if key not in unet_params:
        raise errors.ConfigError(f'The base U-Net has no {key}: the ControlNet does not fit it.')
      params[key] = jax.tree.map(jnp.asarray, unet_params[key])
  return params


def check_fits(controlnet_params, unet_params) -> None:
  """A ControlNet trained on another base architecture, named by its first misfit."""
  flat_c = flax.traverse_util.flatten_dict(controlnet_params)
  flat_u = flax.traverse_util.flatten_dict(unet_params)
  for path, value in flat_c.items():
    if not path[0].startswith(SHARED):
      continue
    theirs = flat_u.get(path)
    if theirs is None or tuple(theirs.shape) != tuple(value.shape):
      raise errors.ConfigError(
          f'This ControlNet was made for another base U-Net: {"/".join(path)} is '
          f'{tuple(value.shape)} here and {None if theirs is None else tuple(theirs.shape)} '
          'in the base.')


# ---- diffusers' ControlNetModel folders ------------------------------------------------------

def diffusers_config(controlnet: ControlNet, cross_attention_dim: int) -> dict:
  """ControlNetModel's constructor arguments for our ControlNet."""
  cfg = sd_config.unet_diffusers_config(controlnet, cross_attention_dim)
  for key in ('up_block_types', 'out_channels', 'sample_size'):
    cfg.pop(key)
  return dict(cfg, conditioning_channels=controlnet.conditioning_channels,
              conditioning_embedding_out_channels=tuple(
                  controlnet.conditioning_embedding_out_channels),
              controlnet_conditioning_channel_order='rgb', global_pool_conditions=False)


def save(folder: str | Path, controlnet: ControlNet, params, cross_attention_dim: int) -> Path:
  """A folder diffusers' ControlNetModel.from_pretrained opens (and `load` reads back)."""
  return convert.save_diffusers_folder(folder, 'ControlNetModel',
                                       diffusers_config(controlnet, cross_attention_dim), params)


def _architecture(unet: ConditionalUNet, key: str, cfg: dict | None = None):
  """What `key` means for the weights' shapes and the computation: attention_heads is the
  head count at each attention level (head_dim 8 at 16 channels = 2 heads); other keys are
  the U-Net's fields, or the config's (cross_attention_dim)."""
  if key == 'attention_heads':
    return tuple(unet.num_heads or c // (unet.head_dim or c)
                 for c, a in zip(unet.block_out_channels, unet.attention_levels()) if a)
  if cfg is not None and key in cfg:
    return cfg[key]
  return getattr(unet, key)


def load(folder: str | Path, unet: ConditionalUNet, unet_params=None, context_width: int = 0,
         vae_factor: int = 0, dtype=jnp.float32):
  """(ControlNet, params in `dtype`) of a diffusers ControlNetModel folder, for the base `unet`.

  Everything that ties it to the base (channels, layers, attention levels and heads, norms,
  latent channels, context width; with `vae_factor`, the control image's downsampling) is
  checked against the base before any weights are read.
  """
  folder = Path(folder)
  path = folder / 'config.json'
  if not path.is_file():
    raise errors.MissingFileError(
        f'{path} not found: expected a ControlNet folder (config.json + '
        'diffusion_pytorch_model.safetensors) as ControlNetModel.save_pretrained or a ControlNet '
        f'run here writes it (WORKDIR/{FOLDER}).')
  try:
    cfg = json.loads(path.read_text())
  except ValueError as e:
    raise errors.DataError(f'{path} is not valid JSON: {e}') from None
  if cfg.get('_class_name', 'ControlNetModel') != 'ControlNetModel':
    raise errors.ConfigError(f'{folder} holds a {cfg["_class_name"]}, not a ControlNetModel.')
  if cfg.get('global_pool_conditions') or cfg.get('controlnet_conditioning_channel_order',
                                                  'rgb') != 'rgb':
    raise errors.ConfigError(f'{path}: global_pool_conditions / BGR channel order are not '
                             'supported.')
  if cfg.get('conditioning_channels', 3) != 3:
    raise errors.ConfigError(f'{path}: conditioning_channels={cfg["conditioning_channels"]}; '
                             'the control maps here are RGB (3 channels).')
  embedding = tuple(cfg.get('conditioning_embedding_out_channels', SD_EMBEDDING_CHANNELS))
  if vae_factor and 2 ** (len(embedding) - 1) != vae_factor:
    raise errors.ConfigError(
        f'{path}: conditioning_embedding_out_channels={embedding} downsamples the control '
        f'image {2 ** (len(embedding) - 1)}x; this pipeline\'s VAE factor is {vae_factor}.')
  base_cfg = sd_config.unet_diffusers_config(unet, context_width or cfg['cross_attention_dim'])
  try:
    theirs = sd_config.unet_from_config(
        dict(cfg, sample_size=unet.sample_size, out_channels=unet.out_channels,
             up_block_types=base_cfg['up_block_types']), unet.dtype)
  except KeyError as e:
    raise errors.DataError(f'{path} lacks the key {e}: not a ControlNetModel config.') from None
  mismatched = [k for k in ('in_channels', 'block_out_channels', 'layers_per_block',
                            'attention_resolutions', 'transformer_depth', 'attention_heads',
                            'linear_projection', 'norm_groups', 'norm_eps')
                if _architecture(theirs, k) != _architecture(unet, k)]
  if context_width and cfg['cross_attention_dim'] != context_width:
    mismatched.append('cross_attention_dim')
  if mismatched:
    raise errors.ConfigError(
        f'The ControlNet in {folder} was made for another base architecture: '
        + ', '.join(f'{k} {_architecture(theirs, k, cfg)} vs the base\'s '
                    f'{_architecture(unet, k, {"cross_attention_dim": context_width})}'
                    for k in mismatched) + '.')
  controlnet = from_unet(unet, 3, embedding)
  state = convert.read_safetensors(folder, 'diffusion_pytorch_model',
                                   'the ControlNet weights are missing from the folder.')
  reference = jax.eval_shape(lambda: controlnet.init(
      jax.random.PRNGKey(0), *dummy_inputs(controlnet, cfg['cross_attention_dim']))['params'])
  try:
    params = convert.params_from_torch_state_dict(state, reference)
  except (KeyError, ValueError) as e:
    raise errors.DataError(f'{folder}: the weights do not fit its config: {e}') from None
  if unet_params is not None:
    check_fits(params, unet_params)
  return controlnet, jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def as_input(maps_uint8) -> jnp.ndarray:
  """uint8 maps -> the ControlNet's float input in [0, 1]."""
  return jnp.asarray(maps_uint8, jnp.float32) / 255.0
