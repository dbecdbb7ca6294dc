"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), as diffusers' AutoencoderKL.

Block for block like diffusers' `AutoencoderKL` (DownEncoderBlock2D /
UpDecoderBlock2D, a mid block with one single-head self-attention, resnet eps
1e-6), with module names equal to its state-dict keys under ddpm.convert's
mechanical mapping (``encoder.down_blocks.0.resnets.0.conv1`` <->
``encoder/down_blocks_0.resnets_0/conv1``), so pretrained diffusers VAEs load
with `load_diffusers_vae`. Layout NHWC; images in [-1, 1].

The encoder outputs the moments of a diagonal Gaussian posterior q(z|x)
(mean and log-variance, ``2 * latent_channels`` channels); the pure functions
`sample`, `mode` and `kl` below are diffusers' DiagonalGaussianDistribution.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import errors
from common.layers import GroupNorm
from ddpm import convert
from ddpm.models import AttentionBlock, Downsample, ResnetBlock, Upsample


Dtype = Any

EPS = 1e-6  # GroupNorm epsilon of every norm in diffusers' autoencoders.
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers clamps the log-variance to this range.


# --- The diagonal Gaussian posterior (pure functions) -----------------------------------------

def split_moments(moments: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """[..., 2C] encoder moments -> (mean, logvar) [..., C], logvar clipped like diffusers."""
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
  return mean, jnp.clip(logvar, *LOGVAR_RANGE)


def sample(mean: jnp.ndarray, logvar: jnp.ndarray, rng: jax.Array) -> jnp.ndarray:
  """z = mean + sigma * eps (the reparameterisation trick: differentiable in mean, logvar)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def mode(mean: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
  del logvar
  return mean


def kl(mean: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
  """KL(q(z|x) || N(0, I)) in closed form, summed over the latent dims: [B]."""
  terms = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
  return 0.5 * jnp.sum(terms, axis=tuple(range(1, mean.ndim)))


# --- Networks ------------------------------------------------------------------------------

def _conv3(features: int, name: str, dtype: Dtype) -> nn.Conv:
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


def conv_out_layer(features: int, dtype: Dtype = jnp.float32) -> nn.Conv:
  """The decoder's last 3x3 conv. latent.vae.loss applies it alone to get last-layer gradients."""
  return _conv3(features, 'conv_out', dtype)


class MidBlock(nn.Module):
  """diffusers' UNetMidBlock2D without time embedding: resnet, self-attention, resnet."""
  channels: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    h = ResnetBlock(self.channels, groups=self.groups, eps=EPS, dtype=self.dtype,
                    name='resnets_0')(h, None)
    # attention_head_dim = channels in diffusers' VAE: one head over all channels.
    h = AttentionBlock(0, self.groups, EPS, self.dtype, name='attentions_0')(h)
    return ResnetBlock(self.channels, groups=self.groups, eps=EPS, dtype=self.dtype,
                       name='resnets_1')(h, None)


class Encoder(nn.Module):
  """x [B, H, W, 3] -> moments [B, H/f, W/f, 2 * latent_channels], f = 2**(levels - 1)."""
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    chans = tuple(self.block_out_channels)
    resnet = lambda c, name: ResnetBlock(c, groups=self.norm_groups, eps=EPS, dtype=self.dtype,
                                         name=name)
    h = _conv3(chans[0], 'conv_in', self.dtype)(x.astype(self.dtype))
    for i, c in enumerate(chans):  # DownEncoderBlock2D: resnets, then a downsampler but last.
      for j in range(self.layers_per_block):
        h = resnet(c, f'down_blocks_{i}.resnets_{j}')(h, None)
      if i < len(chans) - 1:
        h = Downsample(self.dtype, asymmetric=True, name=f'down_blocks_{i}.downsamplers_0')(h)
    h = MidBlock(chans[-1], self.norm_groups, self.dtype, name='mid_block')(h)
    h = nn.silu(GroupNorm(self.norm_groups, epsilon=EPS, dtype=self.dtype,
                             name='conv_norm_out')(h))
    return _conv3(2 * self.latent_channels, 'conv_out', self.dtype)(h)


class Decoder(nn.Module):
  """z [B, h, w, latent_channels] -> x [B, h*f, w*f, out_channels] (float32).

  Sows the input of conv_out as intermediates/conv_out_input (read with
  ``mutable=['intermediates']``): the LDM adaptive GAN weight needs gradients
  with respect to that last layer only.
  """
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  out_channels: int = 3
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    chans = tuple(self.block_out_channels)
    resnet = lambda c, name: ResnetBlock(c, groups=self.norm_groups, eps=EPS, dtype=self.dtype,
                                         name=name)
    h = _conv3(chans[-1], 'conv_in', self.dtype)(z.astype(self.dtype))
    h = MidBlock(chans[-1], self.norm_groups, self.dtype, name='mid_block')(h)
    for i, c in enumerate(reversed(chans)):  # UpDecoderBlock2D: layers + 1 resnets, upsampler.
      for j in range(self.layers_per_block + 1):
        h = resnet(c, f'up_blocks_{i}.resnets_{j}')(h, None)
      if i < len(chans) - 1:
        h = Upsample(self.dtype, name=f'up_blocks_{i}.upsamplers_0')(h)
    h = nn.silu(GroupNorm(self.norm_groups, epsilon=EPS, dtype=self.dtype,
                             name='conv_norm_out')(h))
    self.sow('intermediates', 'conv_out_input', h)
    return conv_out_layer(self.out_channels, self.dtype)(h).astype(jnp.float32)


class AutoencoderKL(nn.Module):
  """encode: x -> (mean, logvar) of q(z|x); decode: z -> x. diffusers' AutoencoderKL."""
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_groups: int = 32
  in_channels: int = 3
  dtype: Dtype = jnp.float32

  @property
  def downsampling_factor(self) -> int:
    return 2**(len(self.block_out_channels) - 1)

  def setup(self):
    chans = tuple(self.block_out_channels)
    self.encoder = Encoder(chans, self.layers_per_block, self.latent_channels, self.norm_groups,
                           self.dtype)
    self.decoder = Decoder(chans, self.layers_per_block, self.in_channels, self.norm_groups,
                           self.dtype)
    self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
    self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)

  def encode(self, x):
    """x [B, H, W, C] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, latent_channels], float32."""
    return split_moments(self.quant_conv(self.encoder(x)))

  def decode(self, z):
    """z [B, h, w, latent_channels] (unscaled latents) -> x [B, h*f, w*f, C], float32."""
    return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

  def __call__(self, x, rng: jax.Array | None = None):
    """(reconstruction, mean, logvar): decodes a posterior sample with `rng`, else its mode."""
    mean, logvar = self.encode(x)
    z = mode(mean, logvar) if rng is None else sample(mean, logvar, rng)
    return self.decode(z), mean, logvar


def init_params(model: AutoencoderKL, rng: jax.Array, image_size: int):
  return model.init(rng, jnp.zeros((1, image_size, image_size, model.in_channels)))['params']


# --- diffusers checkpoints -------------------------------------------------------------------

# Older VAE checkpoints (e.g. the original SD ones) name the attention layers like this;
# diffusers renames them on load, and so do we.
_DEPRECATED_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def diffusers_config(model: AutoencoderKL) -> dict:
  """The diffusers AutoencoderKL constructor arguments of the same architecture."""
  n = len(model.block_out_channels)
  return dict(in_channels=model.in_channels, out_channels=model.in_channels,
              down_block_types=('DownEncoderBlock2D',) * n,
              up_block_types=('UpDecoderBlock2D',) * n,
              block_out_channels=tuple(model.block_out_channels),
              layers_per_block=model.layers_per_block, latent_channels=model.latent_channels,
              norm_num_groups=model.norm_groups)


def _rename_deprecated(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in state_dict.items():
    module, leaf = key.rsplit('.', 1)
    head, _, last = module.rpartition('.')
    if '.attentions.' in module and last in _DEPRECATED_ATTENTION:
      module = f'{head}.{_DEPRECATED_ATTENTION[last]}'
      if value.ndim == 4:  # Old 1x1 conv projections -> linear.
        value = value[:, :, 0, 0]
    out[f'{module}.{leaf}'] = value
  return out


def from_diffusers_config(cfg: dict, dtype: Dtype = jnp.float32,
                          where: str = 'the VAE config') -> AutoencoderKL:
  """Our autoencoder for a diffusers AutoencoderKL config.json (checked: no weights read)."""
  unsupported = {k: cfg[k] for k in ('use_quant_conv', 'use_post_quant_conv', 'mid_block_add_attention')
                 if cfg.get(k) is False}
  if set(cfg.get('down_block_types', ())) - {'DownEncoderBlock2D'} or unsupported:
    raise errors.ConfigError(f'{where} describes an AutoencoderKL variant this port does '
                             f'not have: {cfg.get("down_block_types")} {unsupported}.')
  return AutoencoderKL(block_out_channels=tuple(cfg['block_out_channels']),
                       layers_per_block=cfg['layers_per_block'],
                       latent_channels=cfg['latent_channels'],
                       norm_groups=cfg.get('norm_num_groups', 32),
                       in_channels=cfg.get('in_channels', 3), dtype=dtype)


def load_diffusers_vae(folder: str | Path, dtype: Dtype = jnp.float32):
  """A diffusers AutoencoderKL folder (save_pretrained: config.json + safetensors).

  Returns (model, params, scaling_factor). No torch: the weights are read with
  safetensors' numpy API.
  """
  folder = Path(folder)
  hint = ('expected a diffusers AutoencoderKL folder (config.json and '
          'diffusion_pytorch_model.safetensors, as written by save_pretrained()). Download one on '
          'a machine with network access, e.g. huggingface-cli download stabilityai/sd-vae-ft-mse, '
          'and pass that folder.')
  if not (folder / 'config.json').exists():
    raise errors.MissingFileError(f'{folder / "config.json"} not found: {hint}')
  cfg = json.loads((folder / 'config.json').read_text())
  model = from_diffusers_config(cfg, dtype, str(folder / 'config.json'))
  size = 2 * model.downsampling_factor  # Parameter shapes do not depend on the image size.
  reference = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), size))
  state_dict = _rename_deprecated(convert.read_safetensors(folder, 'diffusion_pytorch_model', hint))
  params = convert.params_from_torch_state_dict(state_dict, reference)
  return model, params, float(cfg.get('scaling_factor', 0.18215))
