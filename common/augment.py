"""On-device data augmentation (the ML2023 HW6 medium baseline).

Random horizontal flip, a small random rotation and brightness/contrast
jitter, applied per image inside the jitted train step, so it costs no host
time and is reproducible from the step's RNG key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from common import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.enabled = False
  c.hflip = True
  c.rotation_degrees = 10.0  # Uniform in [-r, r]; 0 = off.
  c.brightness = 0.1         # Added offset uniform in [-b, b] (images in [-1, 1] have range 2).
  c.contrast = 0.1           # Factor uniform in [1-c, 1+c] around the image mean.
  return c


def validate(c: ml_collections.ConfigDict, prefix: str = 'augment') -> None:
  config_lib.check_keys(c, get_config(), prefix)
  config_lib.check_range(c.rotation_degrees, 0.0, 180.0, f'{prefix}.rotation_degrees')
  config_lib.check_range(c.brightness, 0.0, 1.0, f'{prefix}.brightness')
  config_lib.check_range(c.contrast, 0.0, 1.0, f'{prefix}.contrast')


def rotate(image: jnp.ndarray, angle: jnp.ndarray) -> jnp.ndarray:
  """Rotates one [H, W, C] image counter-clockwise about its centre (as torchvision does).

  Bilinear; pixels from outside the image repeat the edge.
  """
  h, w, _ = image.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing='ij')
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # Inverse map: each output pixel samples the input at the un-rotated position.
  src_y = cos * (yy - cy) + sin * (xx - cx) + cy
  src_x = -sin * (yy - cy) + cos * (xx - cx) + cx
  sample = lambda ch: jax.scipy.ndimage.map_coordinates(ch, [src_y, src_x], order=1, mode='nearest')
  return jax.vmap(sample, in_axes=2, out_axes=2)(image)


def augment(rng: jax.Array, images: jnp.ndarray, c: ml_collections.ConfigDict) -> jnp.ndarray:
  """Augments a batch of [B, H, W, C] images in [-1, 1]."""
  if not c.enabled:
    return images
  b = images.shape[0]
  k_flip, k_rot, k_bright, k_contrast = jax.random.split(rng, 4)
  x = images
  if c.hflip:
    flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1, :], x)
  if c.rotation_degrees:
    angles = jnp.deg2rad(jax.random.uniform(
        k_rot, (b,), minval=-c.rotation_degrees, maxval=c.rotation_degrees))
    x = jax.vmap(rotate)(x, angles)
  if c.brightness:
    x = x + jax.random.uniform(k_bright, (b, 1, 1, 1), minval=-c.brightness, maxval=c.brightness)
  if c.contrast:
    factor = jax.random.uniform(k_contrast, (b, 1, 1, 1), minval=1 - c.contrast, maxval=1 + c.contrast)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * factor + mean
  return jnp.clip(x, -1.0, 1.0)
