"""Attention blocks of the conditional U-Net, as diffusers' Transformer2DModel.

`Transformer2D` (the LDM paper's "spatial transformer") turns a feature map
into H*W tokens, runs `BasicTransformerBlock`s (self-attention, cross-attention
to the conditioning sequence, GEGLU feed-forward, each pre-LayerNorm and
residual) and adds the result back. Module names follow diffusers' keys
(`transformer_blocks.0.attn2.to_k` -> `transformer_blocks_0.attn2.to_k`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from common.layers import GroupNorm, dense, dot_product_attention, gelu


class Attention(nn.Module):
  """Multi-head attention: queries from x, keys and values from `context` (x if None).

  `mask` [B, Lk] (True = attend) hides padding of the context.
  """
  heads: int
  head_dim: int
  qkv_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, mask=None):
    context = x if context is None else context.astype(self.dtype)
    inner = self.heads * self.head_dim
    proj = lambda name, y: dense(y, inner, use_bias=self.qkv_bias, dtype=self.dtype,
                                 name=name).reshape(*y.shape[:2], self.heads, self.head_dim)
    out = dot_product_attention(proj('to_q', x), proj('to_k', context), proj('to_v', context),
                                mask)
    return dense(out.reshape(*x.shape[:2], inner), x.shape[-1], dtype=self.dtype, name='to_out_0')


class GEGLUFeedForward(nn.Module):
  """Linear to 2 x inner, h * GELU(gate), linear back (Shazeer 2020; SD's feed-forward)."""
  mult: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    inner = self.mult * x.shape[-1]
    h, gate = jnp.split(dense(x, 2 * inner, dtype=self.dtype, name='net_0.proj'), 2, axis=-1)
    return dense(h * gelu(gate), x.shape[-1], dtype=self.dtype, name='net_2')


class BasicTransformerBlock(nn.Module):
  heads: int
  head_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, mask=None):
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    attn = lambda name: Attention(self.heads, self.head_dim, dtype=self.dtype, name=name)
    x = x + attn('attn1')(ln('norm1')(x))
    x = x + attn('attn2')(ln('norm2')(x), context, mask)
    return x + GEGLUFeedForward(dtype=self.dtype, name='ff')(ln('norm3')(x))


class Transformer2D(nn.Module):
  """GroupNorm, projection in, `depth` transformer blocks, projection out, + input.

  The projections are linear layers (`linear_projection`, SD 2.x) or 1x1 convolutions
  (SD 1.x): the same map over channels, stored with other kernel shapes.
  """
  heads: int
  depth: int = 1
  groups: int = 32
  dtype: jnp.dtype = jnp.float32
  linear_projection: bool = True

  @nn.compact
  def __call__(self, x, context, mask=None):
    b, h, w, c = x.shape
    proj = lambda name: ((lambda y: dense(y, c, dtype=self.dtype, name=name))
                         if self.linear_projection
                         else nn.Conv(c, (1, 1), dtype=self.dtype, name=name))
    y = GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name='norm')(x)
    y = proj('proj_in')(y).reshape(b, h * w, c)
    for d in range(self.depth):
      y = BasicTransformerBlock(self.heads, c // self.heads, self.dtype,
                                name=f'transformer_blocks_{d}')(y, context, mask)
    return x + proj('proj_out')(y.reshape(b, h, w, c))
