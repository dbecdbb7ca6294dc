"""Differentiable augmentation for small data sets, with ADA's adaptive probability.

DiffAugment (Zhao et al. 2020): colour (brightness, saturation, contrast),
translation (up to 1/8 of the image, zero padded) and cutout (a square of
half the image size), applied to reals *and* fakes right before D, all
differentiable so G's gradients pass through them.

ADA (Karras et al. 2020): each op is applied to each image with probability
p, and p is tuned so the fraction of reals that D calls real,
r_t = E[sign(D(x))], stays near a target (0.6): overfitting D pushes r_t up,
which raises p. Images are in [-1, 1], NHWC.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

# The op names and their parser live with the config (validate checks augment.policy).
from stylegan.configs.base import AUGMENTATIONS, parse_policy  # pylint: disable=unused-import


def _uniform(key, n):
  return jax.random.uniform(key, (n, 1, 1, 1))


def color(key: jax.Array, x: jax.Array) -> jax.Array:
  kb, ks, kc = jax.random.split(key, 3)
  n = x.shape[0]
  x = x + (_uniform(kb, n) - 0.5)                                     # Brightness.
  mean = jnp.mean(x, axis=3, keepdims=True)
  x = (x - mean) * (_uniform(ks, n) * 2.0) + mean                     # Saturation.
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * (_uniform(kc, n) + 0.5) + mean                  # Contrast.


def translation(key: jax.Array, x: jax.Array, ratio: float = 0.125) -> jax.Array:
  """Integer shifts in [-ratio*size, ratio*size], zero (mid-grey) fill."""
  n, h, w, _ = x.shape
  sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
  ky, kx = jax.random.split(key)
  ty = jax.random.randint(ky, (n,), -sh, sh + 1)
  tx = jax.random.randint(kx, (n,), -sw, sw + 1)
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # Out-of-range reads hit the zero border.

  def shift(img, dy, dx):
    iy = jnp.clip(jnp.arange(h) + dy + 1, 0, h + 1)
    ix = jnp.clip(jnp.arange(w) + dx + 1, 0, w + 1)
    return img[iy][:, ix]

  return jax.vmap(shift)(padded, ty, tx)


def cutout(key: jax.Array, x: jax.Array, ratio: float = 0.5) -> jax.Array:
  """Zeroes one (ratio*size)^2 square per image, centred anywhere in the image."""
  n, h, w, _ = x.shape
  ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
  ky, kx = jax.random.split(key)
  oy = jax.random.randint(ky, (n, 1, 1), 0, h + (1 - ch % 2))
  ox = jax.random.randint(kx, (n, 1, 1), 0, w + (1 - cw % 2))
  yy = jnp.arange(h)[None, :, None] - (oy - ch // 2)
  xx = jnp.arange(w)[None, None, :] - (ox - cw // 2)
  inside = (yy >= 0) & (yy < ch) & (xx >= 0) & (xx < cw)
  return x * (1.0 - inside[..., None].astype(x.dtype))


_OPS = {'color': color, 'translation': translation, 'cutout': cutout}


def augment(key: jax.Array, x: jax.Array, policy: Sequence[str], p) -> jax.Array:
  """Applies each op of `policy` to each image independently with probability p.

  p = 1 is plain DiffAugment; p may be a traced scalar (ADA).
  """
  for name in parse_policy(policy):
    key, k_op, k_apply = jax.random.split(key, 3)
    apply = jax.random.uniform(k_apply, (x.shape[0], 1, 1, 1)) < p
    x = jnp.where(apply, _OPS[name](k_op, x), x)
  return x


def ada_adjust(p: jax.Array, rt: jax.Array, target: float, batch_size: int,
               interval: int, ada_kimg: float) -> jax.Array:
  """One ADA step: p moves by sign(r_t - target) * (images seen) / (ada_kimg * 1000).

  So p can go from 0 to 1 in `ada_kimg` thousand images; clipped to [0, 1].
  """
  adjust = jnp.sign(rt - target) * (batch_size * interval) / (ada_kimg * 1000.0)
  return jnp.clip(p + adjust, 0.0, 1.0)
