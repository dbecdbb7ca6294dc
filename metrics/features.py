"""Batched, jitted FID-Inception features of arrays and image folders.

The resize to 299x299 decides the number as much as the weights do, so both
reference behaviours are reproduced exactly:

* 'bilinear' (default, pytorch-fid): torch `F.interpolate(size=(299, 299),
  mode='bilinear', align_corners=False)` on [0, 1] floats, no antialiasing
  (also when downsampling), done on the accelerator as two small matmuls.
* 'clean' (clean-fid): PIL bicubic (antialiased) per channel on float32
  images in [0, 255], clipped, done on the host.

Batches are padded to a fixed size (one compilation) and split over the
local devices along the `data` mesh axis.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from common import imageio
from common import mesh as mesh_lib
from metrics import inception
from metrics import weights as weights_lib

INCEPTION_SIZE = 299
RESIZE_MODES = ('bilinear', 'clean')


# ----------------------------------------------------------------------------
# Resizing.


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] matrix of torch's bilinear interpolation, align_corners=False.

  Row r holds the two taps of output pixel r: source coordinate
  (r + 0.5) * in / out - 0.5, clamped at 0 below (as torch does), and the
  upper neighbour clamped to the last pixel. No antialias filter, so
  downsampling aliases exactly like torch.
  """
  # float32 arithmetic like torch's CPU kernel, so the taps agree to ~1e-7.
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  src = np.maximum((np.arange(out_size, dtype=f32) + f32(0.5)) * scale - f32(0.5), f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0.astype(f32)
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), f32(1) - lam)
  np.add.at(m, (rows, i1), lam)
  return m.astype(np.float32)


def resize_bilinear(x, size: int = INCEPTION_SIZE):
  """NHWC float images -> NHWC size x size, torch-bilinear (jnp or np)."""
  h, w = x.shape[1], x.shape[2]
  if (h, w) == (size, size):
    return x
  xp = jnp if isinstance(x, jax.Array) else np
  hi = jax.lax.Precision.HIGHEST
  rh, rw = bilinear_matrix(h, size), bilinear_matrix(w, size)
  if xp is jnp:
    x = jnp.einsum('oh,bhwc->bowc', rh, x, precision=hi)
    return jnp.einsum('pw,bowc->bopc', rw, x, precision=hi)
  x = np.einsum('oh,bhwc->bowc', rh, x.astype(np.float32))
  return np.einsum('pw,bowc->bopc', rw, x)


def resize_clean(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
  """clean-fid's resize: PIL bicubic per channel in float mode, clipped.

  uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 255].
  """
  channels = []
  for c in range(image.shape[-1]):
    ch = Image.fromarray(np.ascontiguousarray(image[..., c], np.float32))  # mode 'F'
    ch = ch.resize((size, size), resample=Image.Resampling.BICUBIC)
    channels.append(np.asarray(ch).clip(0, 255))
  return np.stack(channels, axis=-1).astype(np.float32)


def to_unit_range(images) -> np.ndarray:
  """uint8 [0, 255] or float [0, 1] images (NHWC, NHW) -> float32 NHWC in [0, 1]."""
  images = np.asarray(images)
  if images.ndim == 3:  # Grayscale N x H x W.
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(f'Expected images [N, H, W, C], got shape {images.shape}.')
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  if images.shape[-1] != 3:
    raise ValueError(
        f'Expected RGB images [N, H, W, 3] (channels last), got shape {images.shape}.')
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  images = images.astype(np.float32)
  lo, hi = float(images.min(initial=0.0)), float(images.max(initial=0.0))
  if lo < -1e-3 or hi > 1.0 + 1e-3:
    raise ValueError(
        f'Float images must be in [0, 1] (got range [{lo:.3g}, {hi:.3g}]); '
        'pass uint8 for [0, 255] or use common.imageio.to_uint8 for [-1, 1].')
  return images


# ----------------------------------------------------------------------------
# The extractor.


class FeatureExtractor:
  """Inception features of image batches, jitted and sharded over local devices.

  Args:
    dims: 2048 (pool3, FID), or 768, 192, 64 for the earlier blocks.
    params: Flax params (`inception.params_from_state_dict`); default: the
      released weights, located by `weights.load_params(weights)`.
    weights: path of the weights file when `params` is not given.
    batch_size: images per step (rounded up to a multiple of the devices).
    resize: 'bilinear' (pytorch-fid) or 'clean' (clean-fid's PIL bicubic).
    devices: devices to shard over; default the local ones.
    micro_batch: images per network call inside a device's share of the
      batch (a sequential `lax.map`); default 1 on CPU, where XLA's
      convolutions run faster per image on one image at a time (cache-sized
      activations), and the whole share on accelerators.
  """

  def __init__(self, dims: int = 2048, params=None, weights: str | os.PathLike | None = None,
               batch_size: int = 50, resize: str = 'bilinear', devices=None,
               micro_batch: int | None = None):
    if dims not in inception.BLOCK_INDEX_BY_DIM:
      raise ValueError(f'dims must be one of {sorted(inception.BLOCK_INDEX_BY_DIM)}, got {dims}.')
    if resize not in RESIZE_MODES:
      raise ValueError(f'resize must be one of {RESIZE_MODES}, got {resize!r}.')
    self.dims = dims
    self.resize = resize
    self.mesh = mesh_lib.make_mesh(devices=jax.local_devices() if devices is None else devices)
    n_dev = self.mesh.devices.size
    self.batch_size = -(-max(1, batch_size) // n_dev) * n_dev
    if params is None:
      params = weights_lib.load_params(weights)
    self.model = inception.FIDInceptionV3((inception.BLOCK_INDEX_BY_DIM[dims],))
    self.params = mesh_lib.replicate(_select_params(params, dims), self.mesh)
    per_device = self.batch_size // n_dev
    if micro_batch is None:
      micro_batch = 1 if self.mesh.devices.flat[0].platform == 'cpu' else per_device
    self.micro_batch = micro_batch if per_device % micro_batch == 0 else per_device

    def network(params, x):
      # x: [b, H, W, 3] float32 in [0, 1].
      x = resize_bilinear(x, INCEPTION_SIZE)
      x = 2.0 * x - 1.0  # pytorch-fid's normalize_input.
      return self.model.apply({'params': params}, x)[0]

    @jax.jit
    def forward(params, x):
      m = self.micro_batch
      if m >= per_device:
        return network(params, x)
      # Device d holds rows [d * per_device, (d + 1) * per_device). Step s of
      # the loop takes rows s*m .. s*m + m - 1 of every device's share, so all
      # devices stay busy: [B, ...] -> [steps, devices, m, ...].
      steps = per_device // m
      xs = x.reshape((n_dev, steps, m) + x.shape[1:]).swapaxes(0, 1)
      out = jax.lax.map(
          lambda c: network(params, c.reshape((n_dev * m,) + c.shape[2:])), xs)
      out = out.reshape((steps, n_dev, m, -1)).swapaxes(0, 1)
      return out.reshape((x.shape[0], -1))

    self._forward = forward

  def _run_batch(self, batch: np.ndarray) -> np.ndarray:
    """One padded batch [n <= batch_size, H, W, 3] in [0, 1] -> [n, dims]."""
    n = batch.shape[0]
    if n < self.batch_size:  # Pad, so every batch has one compiled shape.
      pad = np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)
      batch = np.concatenate([batch, pad])
    out = self._forward(self.params, mesh_lib.shard_batch(batch, self.mesh))
    return mesh_lib.gather(out)[:n].astype(np.float32)

  def _prepare(self, images: np.ndarray) -> np.ndarray:
    """uint8/float images of one size -> float32 [0, 1] ready for `forward`."""
    if self.resize == 'clean':
      u8 = images if images.dtype == np.uint8 else imageio.to_uint8(images, (0.0, 1.0))
      return np.stack([resize_clean(im) for im in u8]) / np.float32(255.0)
    return to_unit_range(images)

  def __call__(self, images, progress: bool = False) -> np.ndarray:
    """Features [N, dims] (float32) of images [N, H, W, 3] (uint8, or float in [0, 1])."""
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    chunks = range(0, images.shape[0], self.batch_size)
    if progress:
      import tqdm  # pylint: disable=g-import-not-at-top
      chunks = tqdm.tqdm(chunks, desc='inception', unit='batch')
    feats = [self._run_batch(self._prepare(images[i:i + self.batch_size])) for i in chunks]
    if not feats:
      return np.zeros((0, self.dims), np.float32)
    return np.concatenate(feats)

  def folder(self, folder: str | os.PathLike, max_images: int | None = None,
             progress: bool = True) -> tuple[np.ndarray, list[Path]]:
    """Features of every readable image below `folder`, in file order.

    Images keep their own size up to the network, which resizes them exactly
    like pytorch-fid. A folder of mixed sizes is fine: images whose size
    differs from the first one are resized on the host with the same
    interpolation (so one compiled shape serves the whole folder).
    Unreadable files are skipped with a warning.

    Returns:
      (features [N, dims], paths of the images used).
    """
    paths = imageio.list_images(folder)
    if max_images is not None:
      paths = paths[:max_images]
    items: Iterable = imageio.iter_images(paths, size=None)
    if progress:
      import tqdm  # pylint: disable=g-import-not-at-top
      name = '/'.join(Path(folder).resolve().parts[-2:])  # 'set/images' reads better than 'images'.
      items = tqdm.tqdm(items, total=len(paths), desc=f'features {name}', unit='img')
    # One buffer per input shape: the first image's size (resized in the
    # network) and 299x299 (everything else, resized here with the same maths).
    buffers: dict[tuple, list[tuple[int, np.ndarray]]] = {}
    feats: dict[int, np.ndarray] = {}
    kept, skipped, resized = [], [], 0
    first_shape = None

    def flush(shape):
      idx, batch = zip(*buffers.pop(shape))
      feats.update(zip(idx, self._run_batch(np.stack(batch))))

    for path, img in items:
      if img is None:
        skipped.append(path)
        continue
      x = self._prepare(img[None])[0]
      if first_shape is None:
        first_shape = x.shape
      elif x.shape != first_shape:
        x = resize_bilinear(x[None], INCEPTION_SIZE)[0]
        resized += 1
      buffers.setdefault(x.shape, []).append((len(kept), x))
      kept.append(path)
      if len(buffers[x.shape]) == self.batch_size:
        flush(x.shape)
    for shape in list(buffers):
      flush(shape)
    if skipped:
      logging.warning('Skipped %d unreadable image file(s) in %s (first: %s).',
                      len(skipped), folder, skipped[0])
    if resized:
      logging.info('%d image(s) in %s differ in size from %s and were resized to %d.',
                   resized, folder, first_shape, INCEPTION_SIZE)
    if not kept:
      raise imageio.NoImagesError(
          f'Image folder {folder} has no readable image: all {len(paths)} '
          'file(s) failed to decode.')
    return np.stack([feats[i] for i in range(len(kept))]), kept


def _select_params(params: dict, dims: int) -> dict:
  """Drops the layers a truncated network (dims < 2048) does not create."""
  last = inception.BLOCK_INDEX_BY_DIM[dims]
  needed = [name for b in range(last + 1) for name in inception.BLOCK_LAYERS[b]]
  missing = [n for n in needed if n not in params]
  if missing:
    raise ValueError(f'Inception params lack layers {missing}.')
  return {n: params[n] for n in needed}


def default_extractor(dims: int = 2048, weights: str | os.PathLike | None = None,
                      batch_size: int = 50, resize: str = 'bilinear') -> FeatureExtractor:
  """An extractor with the released weights, cached per process (one compile).

  The weights file is located first, so the cache follows $FID_INCEPTION_WEIGHTS.
  """
  path = str(weights_lib.find_weights(weights).resolve())
  return _cached_extractor(dims, path, batch_size, resize)


@functools.lru_cache(maxsize=4)
def _cached_extractor(dims, path, batch_size, resize) -> FeatureExtractor:
  return FeatureExtractor(dims=dims, weights=path, batch_size=batch_size, resize=resize)
