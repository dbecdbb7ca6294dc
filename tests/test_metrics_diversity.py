"""metrics.diversity against the O(N^2) definition, and its two ends (collapse, the data)."""

import numpy as np

from metrics import diversity


def test_pairwise_distance_matches_the_definition():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
  f = x.reshape(7, -1).astype(np.float64) / 255.0
  pairs = [np.mean((f[i] - f[j]) ** 2) for i in range(7) for j in range(7) if i != j]
  np.testing.assert_allclose(diversity.pairwise_distance(x), np.sqrt(np.mean(pairs)), rtol=1e-12)
  # Floats are taken as [0, 1] already.
  np.testing.assert_allclose(diversity.pairwise_distance(f.reshape(x.shape)),
                             diversity.pairwise_distance(x), rtol=1e-12)


def test_collapse_scores_zero_and_the_data_scores_one():
  rng = np.random.default_rng(1)
  real = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
  collapsed = np.repeat(real[:1], 64, axis=0)
  assert diversity.diversity_ratio(collapsed, real) < 1e-12
  other = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)  # Same distribution.
  assert abs(diversity.diversity_ratio(other, real) - 1.0) < 0.02
