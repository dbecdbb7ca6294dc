"""Kernel Inception Distance (Bińkowski et al. 2018).

KID is the unbiased estimate of the squared MMD between Inception features
with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
random subsets of (at most) 1000 images, as clean-fid, torch-fidelity and
StyleGAN2-ADA compute it. Unlike FID it is unbiased for small samples.

A source is a folder, an image array [N, H, W, 3], a feature array [N, D],
or a .npz holding `features` (`python -m metrics stats --features`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from metrics import fid as fid_lib


@dataclasses.dataclass
class KIDResult:
  mean: float  # The KID (reported x1e3 in some papers).
  std: float  # Spread over the subsets.
  subset_size: int
  num_subsets: int


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
  gamma = 1.0 / x.shape[1] if gamma is None else gamma
  return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of two equal-size samples with the cubic kernel (float64).

  Drops the diagonals of k(x, x) and k(y, y) (the U-statistic), keeps the
  whole cross term, exactly as clean-fid / torch-fidelity.
  """
  x, y = np.float64(x), np.float64(y)
  m = x.shape[0]
  kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
  within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
  return float(within - 2.0 * kxy.sum() / (m * m))


def kid_from_features(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100,
                      subset_size: int = 1000, seed: int = 0) -> KIDResult:
  """KID over `num_subsets` random subsets of min(subset_size, N1, N2) images."""
  feats1, feats2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
  if feats1.shape[1] != feats2.shape[1]:
    raise ValueError(f'Feature widths differ: {feats1.shape[1]} vs {feats2.shape[1]}.')
  m = min(feats1.shape[0], feats2.shape[0], subset_size)
  if m < 2:
    raise ValueError(f'KID needs at least 2 images per set, got {feats1.shape[0]} and '
                     f'{feats2.shape[0]}.')
  rng = np.random.default_rng(seed)
  values = np.array([
      mmd2_unbiased(feats1[rng.choice(feats1.shape[0], m, replace=False)],
                    feats2[rng.choice(feats2.shape[0], m, replace=False)])
      for _ in range(num_subsets)])
  return KIDResult(float(values.mean()), float(values.std()), m, num_subsets)


def load_features(path: str | os.PathLike) -> np.ndarray:
  with np.load(Path(path), allow_pickle=False) as f:
    if 'features' not in f.files:
      raise ValueError(
          f'{path} holds only statistics (mu, sigma); KID needs per-image features: '
          'pass the image folder, or save them with `python -m metrics stats --features`.')
    return f['features'][:]


def features_of(source, dims: int = 2048, extractor=None, max_images: int | None = None,
                progress: bool = True, **extractor_kwargs) -> np.ndarray:
  if fid_lib.is_statistics_file(source):
    return load_features(source)
  if isinstance(source, np.ndarray) and source.ndim == 2:
    return source  # Already features.
  return fid_lib.compute_features(source, dims, extractor, max_images, progress,
                                  **extractor_kwargs)


def kid(source1, source2, dims: int = 2048, extractor=None, max_images: int | None = None,
        num_subsets: int = 100, subset_size: int = 1000, seed: int = 0, progress: bool = True,
        **extractor_kwargs) -> KIDResult:
  """KID between two sources (folders, image or feature arrays, feature .npz)."""
  fid_lib.check_source(source1)
  fid_lib.check_source(source2)
  f1 = features_of(source1, dims, extractor, max_images, progress, **extractor_kwargs)
  f2 = features_of(source2, dims, extractor, max_images, progress, **extractor_kwargs)
  return kid_from_features(f1, f2, num_subsets, subset_size, seed)
