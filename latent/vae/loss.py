"""Stage-1 losses of latent diffusion: reconstruction + small KL + patch GAN (LDM's LPIPSWithDiscriminator).

  L_AE = rec(x, x') + kl_weight * KL(q(z|x) || N(0, I)) + lambda * disc_weight * hinge_g(D(x'))
  L_D  = hinge_d(D(x), D(sg(x')))

Like LDM, the reconstruction and KL terms are summed over pixels (latent
dims) and averaged over the batch, so kl_weight=1e-6 means what it means in
LDM's configs. `lambda` is LDM's adaptive weight: the ratio of the gradient
norms of the reconstruction and GAN losses with respect to the decoder's last
layer, so the GAN term neither swamps nor vanishes next to the reconstruction.
The GAN terms are switched on after `disc_start` steps (in latent.vae.train).
With lpips_weight > 0 the reconstruction term also has LDM's LPIPS-VGG
perceptual distance (latent/vae/lpips.py; user-converted weights, see check_lpips).

Pure functions, plus the discriminator module.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from common.layers import GroupNorm
from latent.vae import autoencoder
# The choice lists and the jax-free checks live with the config (latent/configs/vae_base.py),
# which validates them before any compute; re-exported here for the model code.
from latent.configs.vae_base import (  # pylint: disable=unused-import
    DISC_NORMS, REC_LOSSES, check_lpips, discriminator_output_size)

ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e4


def reconstruction_loss(x: jnp.ndarray, recon: jnp.ndarray, kind: str) -> jnp.ndarray:
  """|x - x'| and/or (x - x')^2, summed over pixels, averaged over the batch."""
  diff = recon.astype(jnp.float32) - x.astype(jnp.float32)
  per_pixel = {'l1': jnp.abs(diff), 'l2': jnp.square(diff),
               'l1+l2': jnp.abs(diff) + jnp.square(diff)}[kind]
  return jnp.sum(per_pixel) / x.shape[0]


def kl_loss(mean: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
  """The batch mean of the per-example closed-form KL (summed over latent dims)."""
  return jnp.mean(autoencoder.kl(mean, logvar))


# --- Discriminator -------------------------------------------------------------------------

class NLayerDiscriminator(nn.Module):
  """pix2pix's PatchGAN: 4x4 convs, LeakyReLU(0.2); logits [B, h, w, 1], one per patch.

  pix2pix (and LDM) use BatchNorm. We use GroupNorm (or none): BatchNorm's
  running statistics would be mutable state threaded through the train state,
  differ between train and eval, and make D's output for one image depend on
  the rest of its batch (and on how the batch is split over devices). GroupNorm
  normalises each example alone: no state, the same on any device count.
  """
  channels: int = 64
  num_layers: int = 3
  norm: str = 'group'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(0.02)  # LDM's weights_init for the convs.

    def conv(features, stride, bias, name):
      return nn.Conv(features, (4, 4), (stride, stride), padding=((1, 1), (1, 1)), use_bias=bias,
                     kernel_init=init, dtype=self.dtype, name=name)

    def norm(h, name):
      if self.norm == 'none':
        return h
      c = h.shape[-1]
      return GroupNorm(math.gcd(32, c), dtype=self.dtype, name=name)(h)

    h = nn.leaky_relu(conv(self.channels, 2, True, 'conv_0')(x.astype(self.dtype)), 0.2)
    for n in range(1, self.num_layers + 1):
      stride = 2 if n < self.num_layers else 1  # The last hidden layer keeps the size.
      h = conv(self.channels * min(2**n, 8), stride, self.norm == 'none', f'conv_{n}')(h)
      h = nn.leaky_relu(norm(h, f'norm_{n}'), 0.2)
    return conv(1, 1, True, f'conv_{self.num_layers + 1}')(h).astype(jnp.float32)


def hinge_d_loss(logits_real: jnp.ndarray, logits_fake: jnp.ndarray) -> jnp.ndarray:
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake: jnp.ndarray) -> jnp.ndarray:
  return -jnp.mean(logits_fake)


# --- LDM's adaptive GAN weight ---------------------------------------------------------------

def last_layer_grad(model: autoencoder.AutoencoderKL, conv_out_params, conv_out_input,
                    grad_recon: jnp.ndarray) -> jnp.ndarray:
  """d loss / d (decoder conv_out kernel), given d loss / d reconstruction.

  The reconstruction is conv_out(conv_out_input), so this is one conv's
  vector-Jacobian product: no second pass through the network.
  """
  layer = autoencoder.conv_out_layer(model.in_channels, model.dtype)
  h = jax.lax.stop_gradient(conv_out_input)
  apply = lambda kernel: layer.apply(
      {'params': {'kernel': kernel, 'bias': conv_out_params['bias']}}, h).astype(jnp.float32)
  _, vjp = jax.vjp(apply, conv_out_params['kernel'])
  return vjp(grad_recon.astype(jnp.float32))[0]


def adaptive_weight(rec_grad: jnp.ndarray, gan_grad: jnp.ndarray, disc_weight: float) -> jnp.ndarray:
  """disc_weight * ||grad rec|| / (||grad gan|| + 1e-4), clipped to [0, 1e4], no gradient."""
  weight = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(gan_grad) + ADAPTIVE_EPS)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, ADAPTIVE_MAX)) * disc_weight


# --- LPIPS -----------------------------------------------------------------------------------

def lpips_reconstruction_loss(x: jnp.ndarray, recon: jnp.ndarray, kind: str, lpips_weight: float,
                              distance) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(rec + lpips_weight * LPIPS at LDM's scale, the batch-mean LPIPS).

  LDM's LPIPSWithDiscriminator adds the per-image LPIPS [B, 1, 1, 1] to the
  per-pixel |x - x'| [B, C, H, W] (broadcast to every pixel and channel)
  before summing over pixels and averaging over the batch, so each image's
  LPIPS counts C*H*W times: lpips_weight=1 here is LDM's perceptual_weight=1.
  `distance(x, recon)` -> [B].
  """
  d = distance(x, recon)
  pixels = math.prod(x.shape[1:])
  return reconstruction_loss(x, recon, kind) + lpips_weight * pixels * jnp.mean(d), jnp.mean(d)
