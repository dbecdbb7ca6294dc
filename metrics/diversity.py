"""Sample diversity: mean pairwise distance between images, relative to real data.

A generator that has collapsed (one image for every latent) scores near 0; one
whose samples vary as much as the data scores near 1. The distance is the
per-image RMS pixel difference in [0, 1] units, averaged over all pairs;
it is computed exactly from per-pixel moments, so it costs O(N) and not O(N^2):
mean_{i<j} ||x_i - x_j||^2 = 2 N / (N - 1) * sum_p Var_p(x).
The square root of that mean (divided by the pixel count) is reported.
"""

from __future__ import annotations

import numpy as np


def _as_unit_float(images) -> np.ndarray:
  x = np.asarray(images)
  if x.ndim != 4 or len(x) < 2:
    raise ValueError(f'Expected at least 2 images [N, H, W, C], got shape {x.shape}.')
  x = x.astype(np.float64)
  return x / 255.0 if np.asarray(images).dtype == np.uint8 else x


def pairwise_distance(images) -> float:
  """sqrt(mean over pairs i != j of mean_pixels (x_i - x_j)^2), images uint8 or in [0, 1]."""
  x = _as_unit_float(images)
  n = len(x)
  var = x.reshape(n, -1).var(axis=0)  # Population variance per pixel.
  return float(np.sqrt(2.0 * n / (n - 1) * var.mean()))


def diversity_ratio(fake, real) -> float:
  """pairwise_distance(fake) / pairwise_distance(real): 1 = as varied as the data."""
  return pairwise_distance(fake) / max(pairwise_distance(real), 1e-12)
