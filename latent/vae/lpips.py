"""LPIPS-VGG (Zhang et al. 2018), the perceptual loss of LDM's autoencoder, in Flax (NHWC).

  d(x, y) = sum_l mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 )

f_l are VGG16's activations at relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3 (after the `lpips` package's input scaling), n unit-normalises each
pixel's feature vector, w_l >= 0 are the learned 1x1 heads lin0..lin4.
Images are in [-1, 1]; the distance is one number per image.

Nothing is downloaded here: the weights are a user-made .npz, converted from
torchvision's ImageNet VGG16 and the `lpips` package's linear heads with

  python -m latent.lpips convert --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg.npz

vgg16-397923af.pth is https://download.pytorch.org/models/vgg16-397923af.pth
(fetch it on a networked machine); vgg.pth is lpips/weights/v0.1/vgg.pth,
shipped inside the `lpips` wheel on PyPI (`pip install lpips`), and taken from
there when --lin is left out. The .npz holds flat keys named after the
`lpips` module tree with Flax's leaf names: net.slice1.0.kernel (HWIO),
net.slice1.0.bias, ..., lin0.kernel ... lin4.kernel.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from common import atomic, errors
from latent.configs import vae_base

VGG16_URL = vae_base.VGG16_URL

# The `lpips` package's ScalingLayer: ImageNet's mean/std re-expressed for inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# torchvision's vgg16().features, cut after relu1_2 .. relu5_3 as lpips.pretrained_networks.vgg16
# cuts it: (index in `features`, output channels) of each 3x3 conv (each followed by a ReLU).
# Slices 2-5 open with the 2x2 max pool that precedes them in `features` (indices 4, 9, 16, 23);
# the last pool (30) is not used.
VGG16_SLICES = (
    ((0, 64), (2, 64)),
    ((5, 128), (7, 128)),
    ((10, 256), (12, 256), (14, 256)),
    ((17, 512), (19, 512), (21, 512)),
    ((24, 512), (26, 512), (28, 512)),
)
SLICE_OF_INDEX = {i: s + 1 for s, convs in enumerate(VGG16_SLICES) for i, _ in convs}
EPS = 1e-10


def scaling_layer(x: jnp.ndarray) -> jnp.ndarray:
  return (x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype)


def normalize_tensor(feat: jnp.ndarray, eps: float = EPS) -> jnp.ndarray:
  """feat / (||feat||_channels + eps), as lpips.normalize_tensor, with a finite gradient.

  Where ReLU zeroes a whole feature vector, the plain sqrt's derivative at 0 is
  infinite and 0 * inf poisons the gradient with NaN. The value there is 0
  either way; the guarded sqrt gives the zero gradient instead.
  """
  sq = jnp.sum(jnp.square(feat), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return feat / (norm + eps)


class VGGSlice(nn.Module):
  """[2x2 max pool,] then 3x3 conv + ReLU for each (index, channels) of `convs`."""
  convs: tuple
  pool: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h):
    if self.pool:
      h = nn.max_pool(h, (2, 2), strides=(2, 2))  # torch MaxPool2d(2, 2): floor on odd sizes.
    for index, channels in self.convs:
      h = nn.relu(nn.Conv(channels, (3, 3), padding=1, dtype=self.dtype, name=str(index))(h))
    return h


class VGG16(nn.Module):
  """The five relu*_* activations of VGG16's conv stack (lpips' `net`)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    outs, h = [], x
    for s, convs in enumerate(VGG16_SLICES):
      h = VGGSlice(convs, s > 0, self.dtype, name=f'slice{s + 1}')(h)
      outs.append(h)
    return outs


class LPIPS(nn.Module):
  """Images x, y [B, H, W, 3] in [-1, 1] -> LPIPS distance [B] (float32).

  `dtype` is VGG's compute dtype; the normalisation, differences and heads
  always run in float32 (eps=1e-10 is below bfloat16's resolution of a norm).
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, y):
    b = x.shape[0]
    # One pass over both batches: the same convolutions, twice the batch.
    images = scaling_layer(jnp.concatenate([x, y]).astype(jnp.float32))
    total = jnp.zeros((b,), jnp.float32)
    for k, feat in enumerate(VGG16(self.dtype, name='net')(images)):
      feat = normalize_tensor(feat.astype(jnp.float32))
      diff = jnp.square(feat[:b] - feat[b:])
      head = nn.Conv(1, (1, 1), use_bias=False, name=f'lin{k}')(diff)  # Dropout: eval mode.
      total = total + jnp.mean(head, axis=(1, 2, 3))
    return total


def lpips_distance(params, x: jnp.ndarray, y: jnp.ndarray, dtype: Any = jnp.float32) -> jnp.ndarray:
  """LPIPS-VGG distance [B] between NHWC images in [-1, 1]. Pure; jit/grad as needed."""
  return LPIPS(dtype).apply({'params': params}, x, y)


# --- Weights -----------------------------------------------------------------------------------

convert_command = vae_base.lpips_convert_command  # One text for config checks and loading.


@functools.cache
def param_shapes() -> dict[str, tuple[int, ...]]:
  """Flat key -> shape of every parameter (independent of the image size)."""
  dummy = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  tree = jax.eval_shape(LPIPS().init, jax.random.PRNGKey(0), dummy, dummy)['params']
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep='.').items()}


def check_params(flat: dict[str, np.ndarray], source: str | os.PathLike) -> dict[str, np.ndarray]:
  """The flat arrays as float32, or a ValueError naming every missing, extra or mis-shaped key."""
  want = param_shapes()
  problems = []
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  if missing:
    problems.append(f'missing {missing}')
  if extra:
    problems.append(f'unexpected {extra}')
  for key in sorted(set(want) & set(flat)):
    if tuple(np.shape(flat[key])) != want[key]:
      problems.append(f'{key} has shape {tuple(np.shape(flat[key]))}, expected {want[key]}')
    elif key.startswith('lin') and np.any(np.asarray(flat[key]) < 0):
      # LPIPS clamps its heads to >= 0 when training them; a negative weight would make the
      # "distance" reward differences, and a loss built on it push images apart.
      problems.append(f'{key} has negative weights (LPIPS heads are non-negative)')
  if problems:
    raise errors.DataError(f'{source} is not an LPIPS-VGG weights file: {"; ".join(problems)}. Make '
                     f'one with: {convert_command(source)}')
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def npz_keys(path: str | os.PathLike) -> list[str]:
  """The array names in an .npz, read from its zip directory only (no array data)."""
  with np.load(path) as npz:
    return list(npz.files)


def load_params(path: str | os.PathLike):
  """The LPIPS parameter tree (numpy float32) from a converted .npz, checked key by key."""
  path = Path(path)
  if not path.is_file():
    raise errors.MissingFileError(f'No LPIPS weights file {path}. Make it with: {convert_command(path)}')
  with np.load(path) as npz:
    flat = {k: npz[k] for k in npz.files}
  return traverse_util.unflatten_dict(check_params(flat, path), sep='.')


# --- Conversion from the PyTorch weights ------------------------------------------------------

_VGG_KEY = re.compile(r'^(?:features|net\.slice[1-5])\.(\d+)\.(weight|bias)$')
_LIN_KEY = re.compile(r'^lin([0-4])\.model\.[01]\.weight$')


def bundled_lin_weights() -> Path:
  """lpips/weights/v0.1/vgg.pth of the installed `lpips` package, found without importing it.

  (Importing lpips imports torchvision, which needs a patch on some machines.)
  """
  spec = importlib.util.find_spec('lpips')
  if spec is None or not spec.submodule_search_locations:
    raise errors.MissingFileError('--lin was left out and the `lpips` package is not installed: pass '
                            '--lin PATH/TO/lpips/weights/v0.1/vgg.pth or `pip install lpips`.')
  path = Path(list(spec.submodule_search_locations)[0]) / 'weights' / 'v0.1' / 'vgg.pth'
  if not path.is_file():
    raise errors.MissingFileError(f'The installed lpips package has no {path}: pass --lin.')
  return path


def _torch_load(path) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top  # Only the converter needs torch.
  if not Path(path).is_file():
    raise errors.MissingFileError(f'No such file: {path}')
  # weights_only: never unpickle code from a downloaded file. The lpips wheel's vgg.pth holds
  # CUDA tensors: map them to the CPU.
  state = torch.load(path, map_location='cpu', weights_only=True)
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, 'numpy')}


def convert(vgg_path, lin_path=None) -> dict[str, np.ndarray]:
  """Flat LPIPS params from torchvision's vgg16 state dict and lpips' linear heads.

  `vgg_path` may use torchvision's names (features.N.weight) or the lpips
  module's (net.sliceK.N.weight); the classifier and anything else is ignored.
  Conv weights go from torch's OIHW to Flax's HWIO.
  """
  lin_path = bundled_lin_weights() if lin_path is None else lin_path
  flat = {}
  for key, value in _torch_load(vgg_path).items():
    m = _VGG_KEY.match(key)
    if m and int(m.group(1)) in SLICE_OF_INDEX:
      index = int(m.group(1))
      name = f'net.slice{SLICE_OF_INDEX[index]}.{index}'
      if m.group(2) == 'weight':
        flat[f'{name}.kernel'] = value.transpose(2, 3, 1, 0)
      else:
        flat[f'{name}.bias'] = value
  for key, value in _torch_load(lin_path).items():
    m = _LIN_KEY.match(key)
    if m:
      flat[f'lin{m.group(1)}.kernel'] = value.transpose(2, 3, 1, 0)
  return check_params(flat, f'the conversion of {vgg_path} + {lin_path}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m latent.lpips', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  conv = sub.add_parser('convert', help='torch .pth weights -> LPIPS-VGG .npz')
  conv.add_argument('--vgg', required=True,
                    help=f"torchvision's ImageNet vgg16 state dict ({VGG16_URL})")
  conv.add_argument('--lin', default=None,
                    help="lpips' linear heads, lpips/weights/v0.1/vgg.pth (default: the "
                         'installed lpips package\'s)')
  conv.add_argument('--out', required=True, help='the .npz to write')
  args = parser.parse_args(argv)
  flat = convert(args.vgg, args.lin)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  # Never a half-written file under the final name. A file object: np.savez would append
  # .npz to a name without it.
  def write(tmp):
    with open(tmp, 'wb') as f:
      np.savez(f, **flat)
  atomic.write_file(out, write)
  print(f'Wrote {out} ({len(flat)} arrays). Train with --config.loss.lpips_weight=1.0 '
        f'--config.loss.lpips_weights={out}')


if __name__ == '__main__':
  main(sys.argv[1:])
