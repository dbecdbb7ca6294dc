"""The DDPM U-Net (Ho et al. 2020) in Flax, block for block like diffusers' UNet2DModel.

Module names follow diffusers' state-dict keys (``down_blocks.1.resnets.0.conv1``
becomes ``down_blocks_1/resnets_0/conv1``), so ``ddpm.convert`` moves weights
between the two and tests check outputs against diffusers directly.

Layout is NHWC (Flax's native layout); timesteps are integer or float [B].
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from common.layers import GroupNorm, dense, dot_product_attention

Dtype = Any


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0,
                       flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> jnp.ndarray:
  """Sinusoidal embedding of the timestep (Transformer positions), as diffusers' Timesteps."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """MLP on the sinusoidal embedding: linear_1, SiLU, linear_2."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.features, dtype=self.dtype, name='linear_1')(x)
    return nn.Dense(self.features, dtype=self.dtype, name='linear_2')(nn.silu(x))


def conv(features, name, dtype, kernel=3, stride=1):
  """A k x k convolution with symmetric padding, as torch's Conv2d(padding=k // 2)."""
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-dropout-conv, + shortcut.

  With temb=None (the autoencoder's blocks) there is no time_emb_proj.
  """
  out_channels: int
  dropout: float = 0.0
  groups: int = 32
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, train: bool = False):
    norm = lambda name: GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name=name)
    h = conv(self.out_channels, 'conv1', self.dtype)(nn.silu(norm('norm1')(x)))
    if temb is not None:
      h = h + nn.Dense(self.out_channels, dtype=self.dtype,
                       name='time_emb_proj')(nn.silu(temb))[:, None, None, :]
    h = nn.silu(norm('norm2')(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.out_channels, 'conv2', self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 'conv_shortcut', self.dtype, kernel=1)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Self-attention over the H*W positions with a residual connection."""
  head_dim: int = 0  # 0: one head over all channels (the DDPM paper).
  groups: int = 32
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    head_dim = self.head_dim or c
    heads = c // head_dim
    y = GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name='group_norm')(x)
    y = y.reshape(b, h * w, c)
    proj = lambda name: dense(y, c, dtype=self.dtype, name=name).reshape(b, h * w, heads, head_dim)
    y = dot_product_attention(proj('to_q'), proj('to_k'), proj('to_v')).reshape(b, h * w, c)
    y = dense(y, c, dtype=self.dtype, name='to_out_0')
    return x + y.reshape(b, h, w, c)


class Downsample(nn.Module):
  """Stride-2 3x3 conv. `asymmetric` pads right/bottom only, as diffusers' autoencoders do."""
  dtype: Dtype = jnp.float32
  asymmetric: bool = False

  @nn.compact
  def __call__(self, x):
    if not self.asymmetric:
      return conv(x.shape[-1], 'conv', self.dtype, stride=2)(x)
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.Conv(x.shape[-1], (3, 3), (2, 2), padding='VALID', dtype=self.dtype, name='conv')(x)


class Upsample(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), 'nearest')
    return conv(c, 'conv', self.dtype)(x)


class UNet(nn.Module):
  """DDPM U-Net. `attention_resolutions` are feature-map sizes (e.g. (16,) on 32x32 input).

  Attributes mirror UNet2DModel: block_out_channels, layers_per_block, norm
  groups/eps, attention head dim, dropout; `mid_attention` is add_attention.
  """
  sample_size: int
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 256, 256)
  layers_per_block: int = 2
  attention_resolutions: Sequence[int] = (16,)
  head_dim: int = 0
  mid_attention: bool = True
  norm_groups: int = 32
  norm_eps: float = 1e-5
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False  # Recompute each resnet/attention block's activations in the backward
                       # pass instead of keeping them: less memory for ~1/3 more compute.

  def block(self, cls, static_argnums=()):
    """`cls`, rematerialised when self.remat (the parameter names do not change)."""
    return nn.remat(cls, static_argnums=static_argnums) if self.remat else cls

  def attention_levels(self) -> list[bool]:
    return [self.sample_size // 2**i in self.attention_resolutions
            for i in range(len(self.block_out_channels))]

  def attend(self, name: str, h, context, context_mask):
    """The attention block after a resnet. Subclasses (latent.ldm.unet) put cross-attention here."""
    del context, context_mask  # The unconditional model attends to itself only.
    return self.block(AttentionBlock)(self.head_dim, self.norm_groups, self.norm_eps, self.dtype,
                                      name=name)(h)

  def embed_time(self, t, train: bool):
    del train
    chans = tuple(self.block_out_channels)
    temb = timestep_embedding(t, chans[0]).astype(self.dtype)
    return TimestepEmbedding(4 * chans[0], self.dtype, name='time_embedding')(temb)

  def resnet(self, channels: int, name: str):
    cls = self.block(ResnetBlock, static_argnums=(3,))  # `train` (self is 0) is static.
    return cls(channels, self.dropout, self.norm_groups, self.norm_eps, self.dtype, name=name)

  def check_input(self, x):
    if x.ndim != 4 or x.shape[1:] != (self.sample_size, self.sample_size, self.in_channels):
      raise ValueError(f'{type(self).__name__} expects [B, {self.sample_size}, '
                       f'{self.sample_size}, {self.in_channels}] inputs, got {x.shape}.')

  def stem(self, x, t, train: bool):
    """(conv_in's output, the time embedding) of x [B, H, W, C] at t [B] (or a scalar)."""
    self.check_input(x)
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    temb = self.embed_time(t, train)
    return conv(self.block_out_channels[0], 'conv_in', self.dtype)(x.astype(self.dtype)), temb

  def encode(self, h, temb, train: bool, context, context_mask):
    """The down blocks and the mid block from conv_in's output: (h, skips), skips being
    every output the up blocks concatenate (conv_in's, each layer's, each downsampler's)."""
    chans = tuple(self.block_out_channels)
    attn_levels = self.attention_levels()
    skips = [h]
    for i, c in enumerate(chans):
      for j in range(self.layers_per_block):
        h = self.resnet(c, f'down_blocks_{i}.resnets_{j}')(h, temb, train)
        if attn_levels[i]:
          h = self.attend(f'down_blocks_{i}.attentions_{j}', h, context, context_mask)
        skips.append(h)
      if i < len(chans) - 1:
        h = Downsample(self.dtype, name=f'down_blocks_{i}.downsamplers_0')(h)
        skips.append(h)

    h = self.resnet(chans[-1], 'mid_block.resnets_0')(h, temb, train)
    if self.mid_attention:
      h = self.attend('mid_block.attentions_0', h, context, context_mask)
    h = self.resnet(chans[-1], 'mid_block.resnets_1')(h, temb, train)
    return h, skips

  @nn.compact
  def __call__(self, x, t, train: bool = False, context=None, context_mask=None, control=None):
    """eps/x0/v prediction for x [B, H, W, C] at t [B]; `context` [B, L, D] (with
    `context_mask` [B, L]) is the conditioning sequence of cross-attention subclasses.
    `control` = (down residuals, mid residual), a ControlNet's output (latent.controlnet.model),
    is added to the skip connections and to the mid block's output, as diffusers'
    down_block_additional_residuals / mid_block_additional_residual."""
    chans = tuple(self.block_out_channels)
    h, temb = self.stem(x, t, train)
    h, skips = self.encode(h, temb, train, context, context_mask)
    if control is not None:
      down, mid = control
      if len(down) != len(skips):
        raise ValueError(f'control has {len(down)} down residuals; this U-Net has {len(skips)} '
                         'skip connections.')
      skips = [s + r.astype(s.dtype) for s, r in zip(skips, down)]
      h = h + mid.astype(h.dtype)

    attn_levels = self.attention_levels()
    for i, c in enumerate(reversed(chans)):
      level = len(chans) - 1 - i
      for j in range(self.layers_per_block + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = self.resnet(c, f'up_blocks_{i}.resnets_{j}')(h, temb, train)
        if attn_levels[level]:
          h = self.attend(f'up_blocks_{i}.attentions_{j}', h, context, context_mask)
      if level > 0:
        h = Upsample(self.dtype, name=f'up_blocks_{i}.upsamplers_0')(h)

    h = nn.silu(GroupNorm(self.norm_groups, epsilon=self.norm_eps, dtype=self.dtype,
                             name='conv_norm_out')(h))
    return conv(self.out_channels, 'conv_out', self.dtype)(h).astype(jnp.float32)
