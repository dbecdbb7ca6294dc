"""The latent denoiser: ddpm's U-Net with spatial transformers (UNet2DConditionModel's shape).

`ConditionalUNet` is ddpm.models.UNet with each attention block replaced by a
`Transformer2D` that also cross-attends to the conditioning sequence, so the
two U-Nets share every other block and diffusers' UNet2DConditionModel weights
(with use_linear_projection=True) map onto it by name.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ddpm import models
from latent.ldm.attention import Transformer2D


class ConditionalUNet(models.UNet):
  """U-Net on latents; `context` [B, L, D] is read by cross-attention at `attention_resolutions`.

  head_dim: channels per attention head (0 = one head), as in ddpm's U-Net; or
  num_heads: the same number of heads at every level (SD 1.x's 8), overriding head_dim.
  linear_projection: the transformers' proj_in/proj_out are linear (SD 2.x) or 1x1 convs.
  """
  transformer_depth: int = 1
  num_heads: int = 0
  linear_projection: bool = True

  def attend(self, name: str, h, context, context_mask):
    if context is None:
      raise ValueError('ConditionalUNet needs a context sequence [B, L, D].')
    heads = self.num_heads or h.shape[-1] // (self.head_dim or h.shape[-1])
    return self.block(Transformer2D)(heads, self.transformer_depth, self.norm_groups, self.dtype,
                                     self.linear_projection, name=name)(h, context, context_mask)


def controlled_unet(denoiser: nn.Module, z, t, context, mask, train: bool, control,
                    control_scale, guess_mode: bool):
  """denoiser.unet's output, steered by denoiser.controlnet's residuals of the `control`
  images [B, H, W, C] in [0, 1] (none given: the U-Net alone)."""
  residuals = None
  if control is not None:
    if denoiser.controlnet is None:
      raise ValueError('A control image was given to a denoiser without a ControlNet.')
    residuals = denoiser.controlnet(z, t, control, context, mask, control_scale, guess_mode,
                                    train)
  return denoiser.unet(z, t, train, context=context, context_mask=mask, control=residuals)


class ClassEncoder(nn.Module):
  """Class ids [B, 1] -> a one-token context [B, 1, width] from an embedding table."""
  num_classes: int
  width: int

  @nn.compact
  def __call__(self, ids, mask=None):
    del mask
    context = nn.Embed(self.num_classes, self.width, name='embedding')(ids)
    return context, jnp.ones(ids.shape, bool)


class LatentDenoiser(nn.Module):
  """What stage 2 trains: the context encoder, a learned null context and the U-Net.

  The null context (classifier-free guidance's "no condition") is a learned
  [context_length, width] sequence, so it needs no special token or caption.
  """
  unet: ConditionalUNet
  encoder: nn.Module  # latent.ldm.text.TextEncoder or ClassEncoder: ids -> (context, mask).
  context_length: int
  width: int
  controlnet: nn.Module | None = None  # latent.controlnet.model.ControlNet, steering the U-Net.

  def setup(self):
    self.null_context = self.param('null_context', nn.initializers.normal(0.02),
                                   (self.context_length, self.width))

  def encode(self, ids):
    """Condition ids [B, L] -> (context [B, L, width], mask [B, L])."""
    return self.encoder(ids)

  def null(self, batch_size: int):
    context = jnp.broadcast_to(self.null_context, (batch_size, *self.null_context.shape))
    return context, jnp.ones(context.shape[:2], bool)

  def __call__(self, z, t, context, mask, train: bool = False, control=None,
               control_scale=1.0, guess_mode: bool = False):
    return controlled_unet(self, z, t, context, mask, train, control, control_scale, guess_mode)

  def init_all(self, z, t, ids):
    """Touches every submodule, for `init(..., method=LatentDenoiser.init_all)`."""
    return self(z, t, *self.encode(ids))
