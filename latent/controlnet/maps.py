"""Control maps from pictures (what a ControlNet is trained and sampled on), their grids, and
the edge agreement that scores whether samples follow them.

`control_maps` makes a uint8 map of each picture with a detector (`DETECTORS`: OpenCV's
Canny edges as controlnet_aux's CannyDetector, or bold scribble-like strokes), so any
image folder is ControlNet training data; `edge_f1` compares edge maps within a pixel
tolerance; `control_grid` puts each map beside its image.
"""

from __future__ import annotations

import numpy as np

from common import imageio
from latent.configs.ldm_base import DETECTORS


def canny(images: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
  """OpenCV's Canny edges of uint8 [N, H, W, 3] pictures: uint8 [N, H, W, 3], edges 255 (as
  controlnet_aux's CannyDetector gives SD's canny ControlNet)."""
  import cv2  # pylint: disable=g-import-not-at-top
  edges = np.stack([cv2.Canny(np.ascontiguousarray(img), low, high) for img in images])
  return np.repeat(edges[..., None], 3, axis=-1)


def scribble(images: np.ndarray, low: int = 100, high: int = 200,
             thickness: int = 0) -> np.ndarray:
  """A scribble-like map: Canny edges of the blurred picture, thickened (dilated) by
  `thickness` pixels (0 = 1/64 of the side, at least 1) and thresholded: bold strokes of
  the main shapes, close to what a person draws."""
  import cv2  # pylint: disable=g-import-not-at-top
  side = images.shape[1]
  thickness = thickness or max(1, side // 64)
  kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * thickness + 1,) * 2)
  out = []
  for img in images:
    blurred = cv2.GaussianBlur(np.ascontiguousarray(img), (0, 0), max(0.5, side / 128))
    edges = cv2.dilate(cv2.Canny(blurred, low, high), kernel)
    out.append(np.where(edges > 127, 255, 0).astype(np.uint8))
  return np.repeat(np.stack(out)[..., None], 3, axis=-1)


def control_maps(images: np.ndarray, detector: str, low: int = 100, high: int = 200,
                 thickness: int = 0) -> np.ndarray:
  """uint8 control maps [N, H, W, 3] of uint8 pictures with `detector` (DETECTORS)."""
  if detector == 'canny':
    return canny(images, low, high)
  if detector == 'scribble':
    return scribble(images, low, high, thickness)
  raise ValueError(f'detector {detector!r} is not one of {DETECTORS}.')


def control_grid(maps: np.ndarray, images: np.ndarray, pairs_per_row: int = 4) -> np.ndarray:
  """uint8 grid of (control map | image) pairs, `pairs_per_row` pairs a row."""
  both = np.stack([maps, images], axis=1).reshape(-1, *images.shape[1:])
  return imageio.make_grid(both, ncol=2 * min(pairs_per_row, len(images)))


def edge_f1(edges: np.ndarray, reference: np.ndarray, tolerance: int = 1) -> np.ndarray:
  """Per-image F1 of binary edge maps [N, H, W] against reference ones, an edge pixel
  counting as matched when the other map has one within `tolerance` pixels (Chebyshev):
  precision over `edges`, recall over `reference`. An image with no edge in either is 1."""
  import cv2  # pylint: disable=g-import-not-at-top
  kernel = np.ones((2 * tolerance + 1,) * 2, np.uint8)
  scores = []
  for e, r in zip(edges.astype(bool), reference.astype(bool)):
    if not e.any() and not r.any():
      scores.append(1.0)
      continue
    near_r = cv2.dilate(r.astype(np.uint8), kernel).astype(bool)
    near_e = cv2.dilate(e.astype(np.uint8), kernel).astype(bool)
    precision = (e & near_r).sum() / max(1, e.sum())
    recall = (r & near_e).sum() / max(1, r.sum())
    scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
  return np.asarray(scores)
