"""Fréchet Inception Distance (Heusel et al. 2017), as pytorch-fid computes it.

FID = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^{1/2}),
with (mu, Sigma) the mean and covariance of pool3 features. The maths runs
in float64 with scipy's `sqrtm` and pytorch-fid's safeguards, and statistics
files use pytorch-fid's .npz format (`mu`, `sigma`), so reference statistics
computed here or there are interchangeable.

A *source* is any of: a folder of images, a statistics .npz file, an image
array [N, H, W, 3] (uint8, or float in [0, 1]), or a `Statistics`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from scipy import linalg

from common import imageio
from metrics import features as features_lib


class RankDeficientWarning(UserWarning):
  """Fewer images than feature dimensions: singular covariance, biased FID."""


@dataclasses.dataclass
class Statistics:
  """Gaussian fit of Inception features: mean [D] and covariance [D, D]."""
  mu: np.ndarray
  sigma: np.ndarray
  num_images: int | None = None

  def save(self, path: str | os.PathLike) -> Path:
    return save_statistics(self, path)


Source = Union[str, os.PathLike, np.ndarray, Statistics]


def statistics_of_features(feats: np.ndarray) -> Statistics:
  """mu and sigma (float64, unbiased covariance like np.cov) of [N, D] features."""
  feats = np.asarray(feats, np.float64)
  n, d = feats.shape
  if n < 2:
    raise ValueError(f'FID needs at least 2 images to estimate a covariance, got {n}.')
  if n < d:
    warnings.warn(
        f'Only {n} images for {d}-d features: the covariance is rank-deficient '
        'and the FID is biased (use thousands of images for reportable numbers; '
        '10k-50k is standard).', RankDeficientWarning, stacklevel=2)
  return Statistics(feats.mean(axis=0), np.cov(feats, rowvar=False), n)


def save_statistics(stats: Statistics, path: str | os.PathLike) -> Path:
  """pytorch-fid's format: compressed .npz with `mu` and `sigma` (+ num_images)."""
  path = Path(path)
  if path.suffix != '.npz':
    path = path.with_name(path.name + '.npz')
  path.parent.mkdir(parents=True, exist_ok=True)
  extra = {} if stats.num_images is None else {'num_images': np.int64(stats.num_images)}
  np.savez_compressed(path, mu=stats.mu, sigma=stats.sigma, **extra)
  return path


def load_statistics(path: str | os.PathLike) -> Statistics:
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'Statistics file {path} does not exist.')
  with np.load(path, allow_pickle=False) as f:
    if 'mu' not in f.files or 'sigma' not in f.files:
      raise ValueError(f'{path} is not an FID statistics file (needs "mu" and "sigma", '
                       f'has {f.files}).')
    n = int(f['num_images']) if 'num_images' in f.files else None
    return Statistics(f['mu'][:], f['sigma'][:], n)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Fréchet distance of two Gaussians, pytorch-fid's stable version (float64).

  If the product of covariances is singular, `eps` is added to both
  diagonals (pytorch-fid's offset); a large imaginary part of the matrix
  square root is an error rather than a silently wrong number.
  """
  mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
  sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
  if mu1.shape != mu2.shape:
    raise ValueError(f'Mean vectors have different lengths: {mu1.shape} vs {mu2.shape}.')
  if sigma1.shape != sigma2.shape:
    raise ValueError(f'Covariances have different shapes: {sigma1.shape} vs {sigma2.shape}.')
  diff = mu1 - mu2
  covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
  if not np.isfinite(covmean).all():
    logging.warning('FID: singular product of covariances; adding %g to the diagonals.', eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    # Round-off gives a tiny imaginary part; a large one means broken statistics.
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(
          f'FID: the matrix square root has an imaginary component of '
          f'{np.max(np.abs(covmean.imag)):.3g}; the statistics are degenerate '
          '(too few or identical images?).')
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def is_statistics_file(source) -> bool:
  return isinstance(source, (str, os.PathLike)) and str(source).endswith('.npz')


def check_source(source) -> None:
  """Fails fast (before loading any weights) on a missing or image-less folder."""
  if not isinstance(source, (str, os.PathLike)):
    return
  if is_statistics_file(source):
    if not Path(source).is_file():
      raise FileNotFoundError(f'Statistics file {source} does not exist.')
  else:
    imageio.list_images(source)  # Raises for a missing folder or one without images.


def compute_features(source, dims: int = 2048, extractor=None, max_images: int | None = None,
                     progress: bool = True, **extractor_kwargs) -> np.ndarray:
  """Inception features [N, dims] of a folder or an image array."""
  if extractor is None:
    extractor = features_lib.default_extractor(dims=dims, **extractor_kwargs)
  if isinstance(source, (str, os.PathLike)):
    return extractor.folder(source, max_images=max_images, progress=progress)[0]
  images = np.asarray(source)
  if max_images is not None:
    images = images[:max_images]
  if images.shape[0] == 0:
    raise ValueError('Got an empty image array.')
  return extractor(images, progress=progress)


def compute_statistics(source: Source, dims: int = 2048, extractor=None,
                       max_images: int | None = None, progress: bool = True,
                       **extractor_kwargs) -> Statistics:
  """Statistics of a source (folder, .npz, image array or Statistics).

  extractor_kwargs (weights, batch_size, resize) configure the default
  extractor when `extractor` is not given.
  """
  if isinstance(source, Statistics):
    return source
  if is_statistics_file(source):
    stats = load_statistics(source)
    if stats.mu.shape[0] != dims:
      raise ValueError(f'{source} holds {stats.mu.shape[0]}-d statistics, expected {dims}.')
    return stats
  return statistics_of_features(compute_features(
      source, dims, extractor, max_images, progress, **extractor_kwargs))


def fid(source1: Source, source2: Source, dims: int = 2048, extractor=None,
        max_images: int | None = None, progress: bool = True, **extractor_kwargs) -> float:
  """FID between two sources (folders, .npz statistics, arrays, Statistics)."""
  check_source(source1)
  check_source(source2)
  s1 = compute_statistics(source1, dims, extractor, max_images, progress, **extractor_kwargs)
  s2 = compute_statistics(source2, dims, extractor, max_images, progress, **extractor_kwargs)
  return frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
