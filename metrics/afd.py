"""AFD: the anime-face detection rate of generated images (higher is better).

AFD is the share of images in which a detector finds at least one anime face
(ML2023 HW6's second metric). Two detectors:

* 'animeface' (default): python-animeface (nagadomi's imager::AnimeFace),
  offline, its model inside the wheel. It misses faces smaller than ~43 px
  and faces touching the image border, so images whose short side is below
  `min_size` (96) are upscaled by an integer factor (bicubic; 2x for 64 px)
  and every image gets a white border of 25% of its side. Measured: getchu64
  26% native -> 98%; mlds96 83% native -> 92% (border only: upscaling 96 px
  faces 2x drops it to 42%, hence the integer factor up to 96 px only).
* 'yolo': the HW6 community's YOLOv8 anime-face model (`yolov8x6_animeface.pt`,
  conf 0.8, iou 0.8) through `ultralytics` (the `yolo` extra), weights
  supplied by the user. Images are fed at native size by default.

The animeface wheel reads Pillow's internal image struct and, with Pillow 12+,
silently finds no face at all. `self_check` (run before every evaluation)
draws a face the detector must find and a blank it must not, so a broken
install raises instead of reporting AFD = 0.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from common import imageio

YOLO_CONF = 0.8
YOLO_IOU = 0.8


class DetectorBrokenError(RuntimeError):
  """The detector fails its self-check (e.g. animeface with Pillow 12+)."""


@dataclasses.dataclass
class ImageResult:
  name: str  # File path, or the index for arrays.
  num_faces: int
  best_likelihood: float  # 0 when no face is found.


@dataclasses.dataclass
class AFDResult:
  rate: float  # Share of images with at least one face, in [0, 1].
  num_images: int
  num_detected: int
  detector: str
  per_image: list[ImageResult]

  def write_csv(self, path: str | os.PathLike) -> Path:
    """One row per image (file, num_faces, best_likelihood), to inspect failures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', newline='') as f:
      w = csv.writer(f)
      w.writerow(['file', 'num_faces', 'best_likelihood'])
      for r in self.per_image:
        w.writerow([r.name, r.num_faces, f'{r.best_likelihood:.6f}'])
    return path

  def failures(self) -> list[str]:
    return [r.name for r in self.per_image if r.num_faces == 0]


def pad_and_upscale(image: Image.Image, min_size: int = 96, border: float = 0.25) -> Image.Image:
  """Upscales (bicubic, integer factor) until the short side is >= min_size,
  then adds a white border of `border` x the (upscaled) side on every edge."""
  w, h = image.size
  factor = max(1, math.ceil(min_size / min(w, h))) if min_size else 1
  if factor > 1:
    image = image.resize((w * factor, h * factor), Image.Resampling.BICUBIC)
  if border > 0:
    b = int(round(border * min(image.size)))
    image = ImageOps.expand(image, border=b, fill=(255, 255, 255))
  return image


def synthetic_face(size: int = 128) -> Image.Image:
  """A simple anime face (hair, fringe, big eyes with highlights, mouth).

  animeface finds it with likelihood ~0.998 at 128 px; any working detector
  must find it, and a broken install (Pillow 12+) finds nothing.
  """
  im = Image.new('RGB', (size, size), (255, 255, 255))
  d = ImageDraw.Draw(im)
  s = size / 128
  hair, skin, iris = (90, 50, 30), (255, 224, 200), (40, 60, 160)

  def ellipse(box, fill):
    d.ellipse([v * s for v in box], fill=fill)

  def polygon(points, fill):
    d.polygon([(x * s, y * s) for x, y in points], fill=fill)

  ellipse((14, 6, 114, 120), hair)
  polygon([(26, 50), (102, 50), (96, 92), (64, 118), (32, 92)], skin)
  polygon([(20, 20), (108, 20), (104, 52), (84, 42), (64, 56), (44, 42), (24, 52)], hair)
  for cx in (46, 82):
    ellipse((cx - 11, 58, cx + 11, 84), (255, 255, 255))
    ellipse((cx - 8, 60, cx + 8, 84), iris)
    ellipse((cx - 4, 66, cx + 4, 78), (10, 10, 30))
    ellipse((cx - 6, 63, cx - 1, 68), (255, 255, 255))
    d.line([(cx - 12) * s, 57 * s, (cx + 12) * s, 57 * s], fill=(30, 20, 20),
           width=max(1, int(2 * s)))
  d.line([60 * s, 102 * s, 68 * s, 102 * s], fill=(200, 80, 80), width=max(1, int(2 * s)))
  return im


class AnimeFaceDetector:
  """python-animeface with the small-image preprocessing (see module doc)."""
  name = 'animeface'

  def __init__(self, min_size: int = 96, border: float = 0.25, min_likelihood: float = 0.0):
    try:
      import animeface  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError('AFD needs python-animeface: pip install "animeface>=2.0.3" '
                        '"pillow>=10.4,<11.4"') from e
    self._detect = animeface.detect
    self.min_size, self.border, self.min_likelihood = min_size, border, min_likelihood

  def preprocess(self, image: Image.Image) -> Image.Image:
    return pad_and_upscale(image, self.min_size, self.border)

  def likelihoods(self, image: Image.Image) -> list[float]:
    """Likelihoods of the faces found in one (raw) image."""
    faces = self._detect(self.preprocess(image.convert('RGB')))
    return [f.likelihood for f in faces if f.likelihood >= self.min_likelihood]


class YoloDetector:
  """The HW6 YOLOv8 anime-face detector (ultralytics), weights from the user."""
  name = 'yolo'

  def __init__(self, weights: str | os.PathLike, conf: float = YOLO_CONF, iou: float = YOLO_IOU,
               min_size: int = 0, border: float = 0.0, device: str | None = None):
    if not weights or not Path(weights).is_file():
      raise FileNotFoundError(
          f'YOLO weights {weights!r} not found: download yolov8x6_animeface.pt '
          '(the HW6 anime-face model, e.g. from the Fuyucch1/yolov8_animeface release) '
          'and pass its path (--yolo-weights).')
    try:
      from ultralytics import YOLO  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError('The YOLO detector needs ultralytics: pip install -e .[yolo] '
                        '(with a torch==2.13.0 constraint on CPU machines).') from e
    self.model = YOLO(str(weights))
    self.conf, self.iou, self.device = conf, iou, device
    self.min_size, self.border = min_size, border

  def preprocess(self, image: Image.Image) -> Image.Image:
    return pad_and_upscale(image, self.min_size, self.border)

  def likelihoods(self, image: Image.Image) -> list[float]:
    results = self.model.predict(self.preprocess(image.convert('RGB')), conf=self.conf,
                                 iou=self.iou, device=self.device, verbose=False)
    return [float(c) for r in results for c in r.boxes.conf.tolist()]


def make_detector(name: str = 'animeface', **kwargs):
  if name == 'animeface':
    return AnimeFaceDetector(**kwargs)
  if name == 'yolo':
    return YoloDetector(**kwargs)
  raise ValueError(f'Unknown detector {name!r}; choose "animeface" or "yolo".')


def self_check(detector) -> None:
  """Raises DetectorBrokenError unless the detector finds the synthetic face
  (drawn at 128 px) and nothing on a blank image."""
  found = detector.likelihoods(synthetic_face(128))
  blank = detector.likelihoods(Image.new('RGB', (128, 128), (255, 255, 255)))
  if not found or blank:
    import PIL  # pylint: disable=g-import-not-at-top
    raise DetectorBrokenError(
        f'The {detector.name} face detector failed its self-check (synthetic face: '
        f'{len(found)} found, expected 1+; blank image: {len(blank)} found, expected 0), '
        f'so AFD would be meaningless. Pillow is {PIL.__version__}: python-animeface '
        'needs Pillow >= 10.4, < 11.4 (it silently finds nothing with Pillow 12+): '
        'pip install "pillow>=10.4,<11.4".')


def _as_pil_items(source, max_images: int | None) -> tuple[list, Iterable]:
  """(names, iterator of PIL images or None) for a folder or an image array."""
  if isinstance(source, (str, os.PathLike)):
    paths = imageio.list_images(source)[:max_images]
    items = (None if img is None else Image.fromarray(img)
             for _, img in imageio.iter_images(paths, size=None))
    return [str(p) for p in paths], items
  images = np.asarray(source)
  if images.ndim not in (3, 4) or images.shape[0] == 0:
    raise ValueError(f'Expected images [N, H, W, 3], got shape {images.shape}.')
  images = images[:max_images]
  if images.dtype != np.uint8:
    images = imageio.to_uint8(images, (0.0, 1.0))  # Floats in [0, 1].
  return [str(i) for i in range(len(images))], (Image.fromarray(im.squeeze()) for im in images)


def afd(source, detector='animeface', csv_path: str | os.PathLike | None = None,
        max_images: int | None = None, progress: bool = True, check: bool = True,
        **detector_kwargs) -> AFDResult:
  """Anime-face detection rate of a folder or an image array (uint8, or float in [0, 1]).

  Args:
    source: image folder or array [N, H, W, 3].
    detector: 'animeface', 'yolo', or a detector object with `likelihoods`.
    csv_path: where to write the per-image results (optional).
    check: run `self_check` first (leave on: it guards against AFD = 0 from
      a broken install).
    detector_kwargs: for `make_detector`, e.g. min_size, border, weights.
  """
  if isinstance(detector, str):
    detector = make_detector(detector, **detector_kwargs)
  if check:
    self_check(detector)
  names, items = _as_pil_items(source, max_images)
  pairs = zip(names, items)
  if progress:  # Around the pairs, so the bar's last tick comes with the last image.
    import tqdm  # pylint: disable=g-import-not-at-top
    pairs = tqdm.tqdm(pairs, total=len(names), desc=f'AFD ({detector.name})', unit='img')
  per_image, unreadable = [], 0
  for name, img in pairs:
    if img is None:
      unreadable += 1
      continue
    lik = detector.likelihoods(img)
    per_image.append(ImageResult(name, len(lik), max(lik, default=0.0)))
  if not per_image:
    raise imageio.NoImagesError(f'{source}: no readable image ({unreadable} unreadable).')
  detected = sum(r.num_faces > 0 for r in per_image)
  result = AFDResult(detected / len(per_image), len(per_image), detected, detector.name, per_image)
  if csv_path is not None:
    result.write_csv(csv_path)
  return result
