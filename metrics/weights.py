"""Locating, downloading and safely loading the FID Inception weights.

The file is pytorch-fid's release `pt_inception-2015-12-05-6726825d.pth`
(the TF 2015-12-05 Inception graph ported to torch). Only the metrics need
it; nothing in training imports this module.

Search order: an explicit path, then $FID_INCEPTION_WEIGHTS, then the cache
folder ($JAXGEN_CACHE or ~/.cache/jaxgen, `.pth` or a converted `.npz`),
then torch hub's cache where pytorch-fid itself keeps it. When nothing is
found the file is downloaded into the cache and its SHA-256 checked; offline,
the error names the file, its URL and where to put it.

Loading never unpickles arbitrary objects: `.pth` goes through
`torch.load(weights_only=True)`, and `.npz` / `.safetensors` files (see
`convert`, or `python -m metrics convert-weights`) need no torch at all.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

import numpy as np

FILENAME = 'pt_inception-2015-12-05-6726825d.pth'
URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
       + FILENAME)
# torch hub names files <name>-<first 8 hex of sha256>.pth and checks that prefix on
# download (torch.hub.download_url_to_file's hash_prefix); we check the same.
SHA256_PREFIX = FILENAME.rsplit('-', 1)[1].split('.')[0]
ENV_VAR = 'FID_INCEPTION_WEIGHTS'
CACHE_ENV_VAR = 'JAXGEN_CACHE'
CONVERTED_FILENAME = Path(FILENAME).with_suffix('.npz').name


class WeightsNotFoundError(FileNotFoundError):
  """The Inception weights are neither on disk nor downloadable."""


def cache_dir() -> Path:
  return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / '.cache' / 'jaxgen')


def _torch_hub_file() -> Path:
  torch_home = os.environ.get('TORCH_HOME') or Path(
      os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'torch'
  return Path(torch_home) / 'hub' / 'checkpoints' / FILENAME


def _not_found_message(reason: str) -> str:
  return (
      f'FID Inception weights not found ({reason}).\n'
      f'  File: {FILENAME}\n'
      f'  URL:  {URL}\n'
      f'  SHA-256 starts with: {SHA256_PREFIX}\n'
      f'Download it and either put it at {cache_dir() / FILENAME}, '
      f'set {ENV_VAR}=/path/to/{FILENAME}, or pass its path (--weights). '
      'A converted .npz (python -m metrics convert-weights IN.pth OUT.npz) works too.')


def sha256_of(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def download(dest: str | os.PathLike | None = None, url: str = URL,
             timeout: float = 30.0) -> Path:
  """Downloads the weights to `dest` (default: the cache) and checks the SHA-256 prefix."""
  dest = Path(dest) if dest is not None else cache_dir() / FILENAME
  dest.parent.mkdir(parents=True, exist_ok=True)
  logging.info('Downloading FID Inception weights from %s to %s', url, dest)
  fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix='.part')
  try:
    with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url, timeout=timeout) as resp:
      shutil.copyfileobj(resp, out)
    digest = sha256_of(tmp)
    if not digest.startswith(SHA256_PREFIX):
      raise WeightsNotFoundError(_not_found_message(
          f'downloaded file has SHA-256 {digest}, expected one starting with {SHA256_PREFIX}'))
    os.replace(tmp, dest)
  except (urllib.error.URLError, OSError, ValueError) as e:
    if isinstance(e, WeightsNotFoundError):
      raise
    raise WeightsNotFoundError(_not_found_message(f'download failed: {e}')) from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return dest


def find_weights(path: str | os.PathLike | None = None, allow_download: bool = True) -> Path:
  """The weights file to use (see the module docstring for the search order)."""
  if path is not None:
    path = Path(path).expanduser()
    if not path.is_file():
      raise WeightsNotFoundError(_not_found_message(f'{path} does not exist'))
    return path
  env = os.environ.get(ENV_VAR)
  if env:
    env_path = Path(env).expanduser()
    if not env_path.is_file():
      raise WeightsNotFoundError(_not_found_message(f'${ENV_VAR}={env} does not exist'))
    return env_path
  for candidate in (cache_dir() / CONVERTED_FILENAME, cache_dir() / FILENAME, _torch_hub_file()):
    if candidate.is_file():
      return candidate
  if not allow_download:
    raise WeightsNotFoundError(_not_found_message(
        f'not in {cache_dir()} nor {_torch_hub_file().parent}, download disabled'))
  return download()


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a state dict (.pth, .npz or .safetensors) as numpy arrays, safely."""
  path = Path(path)
  suffix = path.suffix.lower()
  if suffix == '.npz':
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if suffix == '.safetensors':
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(str(path))
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'Reading {path.name} (a torch file) needs torch. Without torch, convert it '
        'once elsewhere: python -m metrics convert-weights IN.pth OUT.npz') from e
  # weights_only: tensors and containers only, no arbitrary pickled code.
  sd = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(sd, Mapping):
    raise ValueError(f'{path} does not hold a state dict (got {type(sd).__name__}).')
  return {k: v.detach().cpu().numpy() for k, v in sd.items()
          if hasattr(v, 'detach')}


def convert(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
  """Writes a torch-free .npz (or .safetensors) copy of a weights file."""
  sd = load_state_dict(src)
  dest = Path(dest)
  dest.parent.mkdir(parents=True, exist_ok=True)
  if dest.suffix.lower() == '.safetensors':
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(dest))
  else:
    if dest.suffix.lower() != '.npz':  # np.savez would append it silently.
      dest = dest.with_name(dest.name + '.npz')
    np.savez(dest, **sd)
  return dest


def load_params(path: str | os.PathLike | None = None, allow_download: bool = True) -> dict:
  """Flax params of the FID Inception from the located weights file."""
  from metrics import inception  # pylint: disable=g-import-not-at-top
  return inception.params_from_state_dict(load_state_dict(find_weights(path, allow_download)))
