"""Hair-colour attribute accuracy: do generated anime faces follow the prompt?

For images generated from prompts such as "blonde long hair and blue eyes",
the score is the share of images whose detected hair colour is the colour the
prompt names, over the images in which a face is found:

  from metrics import attributes
  paths, captions = attributes.read_captions('samples/')     # samples/captions.tsv
  paths, targets = attributes.captioned_targets(paths, captions)  # 'blonde', ...
  r = attributes.attribute_accuracy(paths, targets)
  r.accuracy, r.detection_rate, r.chance, r.confusion, r.write_csv('hair.csv')

Command line: python -m metrics attributes FOLDER [--captions captions.tsv] [--csv out.csv].

The hair colour is python-animeface's estimate (`face.hair.color`, RGB) for the
most likely face, detected with `metrics.afd`'s preprocessing (integer
upscale below 96 px, white border) and animeface's random generator reset
before every image (`seed_animeface`). It is mapped to the nearest entry of
`PALETTE`, one reference colour per hair-colour word, compared in CIELAB.
The palette was fitted on real faces (see `PALETTE`), not guessed:
animeface's hair estimates are paler and greyer than the names suggest (its
blonde is a pale tan, its blue a greyish blue): a textbook palette scores
0.42 held out, the fitted one 0.53 (chance 0.19). The captions are noisy
tags, so real faces score about 0.53, not 1 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import functools
import logging
import os
import re
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from common import imageio
from metrics import afd

# The colour words of the captions (tags of the NTU MLDS anime-face set).
HAIR_COLOURS = ('blonde', 'brown', 'black', 'blue', 'red', 'purple', 'green', 'pink', 'aqua',
                'yellow', 'gray', 'white', 'orange')
HAIR_LENGTHS = ('long', 'short')
# Other words for a target colour. 'yellow' is only ever an eye colour in the
# captions (no "yellow hair" among 8,717 captioned faces), so it has no fitted
# reference; anime "yellow hair" is drawn blonde, and scored as such.
COLOUR_ALIASES = {'blond': 'blonde', 'grey': 'gray', 'yellow': 'blonde'}
# The names a hair colour is scored as: the keys of PALETTE, rows and columns
# of the confusion matrix.
TARGET_COLOURS = tuple(c for c in HAIR_COLOURS if c not in COLOUR_ALIASES)

# One reference colour per name: the per-channel median of animeface's hair
# colour (RGB, seed 0) over the faces whose caption names that single hair
# colour, on the calibration split of anime_faces_mlds96_tagged (the first
# 3,000 rows of its captions.tsv: 2,346 such images; the other 3,000 rows are
# held out). Refit with
#   python benchmarks/calibrate_attributes.py --write
# which prints this dict, SPACE and the accuracies (benchmarks/RESULTS.md).
PALETTE = {
    'blonde': (221, 176, 133),
    'brown': (143, 90, 81),
    'black': (68, 60, 66),
    'blue': (123, 147, 182),
    'red': (192, 72, 90),
    'purple': (156, 121, 164),
    'green': (126, 162, 118),
    'pink': (230, 155, 164),
    'aqua': (127, 180, 184),
    'gray': (178, 168, 174),
    'white': (204, 196, 192),
    'orange': (220, 136, 84),
}
# Colour space of the nearest-colour search. CIELAB scored best held out
# (0.530, vs 0.528 for the HSV cone and 0.401 for RGB; 0.529 / 0.514 / 0.403
# on anime_faces_mlds96), though the HSV cone was 0.5 points better in
# cross-validation on the calibration half: the two are within noise, RGB is not.
SPACE = 'lab'


class HairDetection(NamedTuple):
  """Hair colour of one image's most likely face; (None, None, 0.0) when no face."""
  name: str | None  # Nearest PALETTE name.
  rgb: tuple[int, int, int] | None  # animeface's hair colour.
  likelihood: float


# ---------------------------------------------------------------------------
# Captions.


def canonical_colour(word: str) -> str | None:
  """The target name of a colour word ('Grey' -> 'gray', 'yellow' -> 'blonde'),
  None if it is no hair colour."""
  word = COLOUR_ALIASES.get(word.lower(), word.lower())
  return word if word in TARGET_COLOURS else None


def hair_colours_from_caption(caption: str) -> tuple[str, ...]:
  """All hair colours a caption names, in order, without repeats.

  A caption is a list of phrases ending in "hair" or "eyes" ("blonde long hair
  and blue eyes", "long purple hair", "blue eyes", "black blonde long pink
  short hair and blue red eyes"), in either order, joined by "and" or commas.
  Only the colour words of the phrase ending in "hair" count, so eye colours
  (same words) are ignored.
  """
  colours, phrase = [], []
  for word in re.findall(r'[a-z]+', caption.lower()):
    if word == 'hair':
      colours += [c for c in map(canonical_colour, phrase) if c]
      phrase = []
    elif word in ('eyes', 'eye'):
      phrase = []
    else:
      phrase.append(word)
  return tuple(dict.fromkeys(colours))  # Order kept, repeats dropped.


def hair_colour_from_caption(caption: str) -> str | None:
  """The hair colour of a caption: "red short hair and blue eyes" -> 'red'.

  None when the caption names no hair colour ("short hair", "blue eyes") or
  several ("black blonde long hair": the tags of such faces conflict, so no
  single colour is the target).
  """
  colours = hair_colours_from_caption(caption)
  return colours[0] if len(colours) == 1 else None


def read_captions(folder: str | os.PathLike,
                  captions: str | os.PathLike | None = None) -> tuple[list[Path], list[str]]:
  """(image paths, captions) of a folder with a `file<TAB>caption` table.

  `captions` defaults to FOLDER/captions.tsv. Each `file` is looked up among
  the images below FOLDER, by its path relative to FOLDER or else by its name
  (so a dataset root with images/ and captions.tsv works too). Rows come in
  the table's order; images without a row are left out.
  """
  folder = Path(folder)
  table = Path(captions) if captions is not None else folder / 'captions.tsv'
  rows = imageio.read_caption_table(table)
  images = imageio.list_images(folder)
  by_relpath = {p.relative_to(folder).as_posix(): p for p in images}
  by_name: dict[str, Path | None] = {}
  for p in images:
    by_name[p.name] = None if p.name in by_name else p  # None: ambiguous name.
  paths, texts, missing = [], [], []
  for name, caption in rows:
    path = by_relpath.get(Path(name).as_posix()) or by_name.get(Path(name).name)
    if path is None:
      missing.append(name)
      continue
    paths.append(path)
    texts.append(caption)
  if missing:
    raise FileNotFoundError(f'{table}: {len(missing)} captioned file(s) not found (or not '
                            f'unique) below {folder}, e.g. {missing[:3]}.')
  if not paths:
    raise imageio.NoImagesError(f'{table} captions no image of {folder}.')
  return paths, texts


# ---------------------------------------------------------------------------
# Colours.


_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb) -> np.ndarray:
  """CIELAB (D65) of sRGB uint8 colours [..., 3]: distances there roughly follow
  perceived differences, unlike RGB's (dark colours crowd together in RGB)."""
  c = np.asarray(rgb, np.float64) / 255.0
  linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
  xyz = linear @ _SRGB_TO_XYZ.T / _D65_WHITE
  delta = 6 / 29
  f = np.where(xyz > delta ** 3, np.cbrt(xyz), xyz / (3 * delta ** 2) + 4 / 29)
  return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                   200 * (f[..., 1] - f[..., 2])], axis=-1)


def srgb_to_hsv_cone(rgb) -> np.ndarray:
  """HSV as points of a cone, (chroma cos hue, chroma sin hue, value), in [0, 1]:
  hue wraps around (red at 359 deg is next to red at 1 deg) and matters less as
  the colour greys, as it should for black, gray and white."""
  c = np.asarray(rgb, np.float64) / 255.0
  hi, lo = c.max(-1), c.min(-1)
  chroma = hi - lo
  r, g, b = np.moveaxis(c, -1, 0)
  safe = np.where(chroma > 0, chroma, 1.0)
  hue = np.where(hi == r, ((g - b) / safe) % 6,
                 np.where(hi == g, (b - r) / safe + 2, (r - g) / safe + 4)) * (np.pi / 3)
  return np.stack([chroma * np.cos(hue), chroma * np.sin(hue), hi], axis=-1)


COLOUR_SPACES = {
    'lab': srgb_to_lab,
    'hsv': srgb_to_hsv_cone,
    'rgb': lambda rgb: np.asarray(rgb, np.float64),
}


def nearest_colour(rgb, palette: dict | None = None, space: str | None = None) -> np.ndarray:
  """Names of the palette colours nearest to uint8 RGB colours [..., 3] (array of str)."""
  palette = PALETTE if palette is None else palette
  space = SPACE if space is None else space
  if space not in COLOUR_SPACES:
    raise ValueError(f'Unknown colour space {space!r}; choose from {sorted(COLOUR_SPACES)}.')
  to_space = COLOUR_SPACES[space]
  names = list(palette)
  refs = to_space(np.array([palette[n] for n in names]))
  points = to_space(rgb)
  dist = np.linalg.norm(points[..., None, :] - refs, axis=-1)
  return np.array(names)[dist.argmin(-1)]


def fit_palette(rgbs, names: Sequence[str], statistic: str = 'median') -> dict:
  """One reference RGB per name: the per-channel median (or mean) of the
  colours labelled with it. Names without any colour are left out."""
  reduce = {'median': np.median, 'mean': np.mean}[statistic]
  rgbs, names = np.asarray(rgbs, np.float64), np.asarray(names)
  return {n: tuple(int(round(v)) for v in reduce(rgbs[names == n], axis=0))
          for n in TARGET_COLOURS if (names == n).any()}


# ---------------------------------------------------------------------------
# Detection and scoring.


def _is_path_list(source) -> bool:
  return isinstance(source, (list, tuple)) and all(
      isinstance(s, (str, os.PathLike)) for s in source)


def image_names(source) -> list[str]:
  """Per-image names (file path, else the index) of a folder, a list of paths
  or PIL images, or an image array, in the order images are evaluated."""
  if isinstance(source, (str, os.PathLike)):
    return [str(p) for p in imageio.list_images(source)]
  if isinstance(source, (list, tuple)) and not source:
    raise imageio.NoImagesError('No image given (empty list).')
  if _is_path_list(source):
    return [str(s) for s in source]
  return [str(i) for i in range(len(source))]


def _pil_images(source) -> tuple[list[str], object]:
  """(names, iterator of PIL images or None when unreadable) for a folder, an
  image array (uint8, or float in [0, 1]), or a list of paths / PIL images."""
  names = image_names(source)
  if _is_path_list(source):
    items = (None if img is None else Image.fromarray(img)
             for _, img in imageio.iter_images([Path(s) for s in source], size=None))
    return names, items
  if isinstance(source, (list, tuple)) and all(isinstance(s, Image.Image) for s in source):
    return names, iter(source)
  return afd._as_pil_items(source, None)  # pylint: disable=protected-access


@functools.lru_cache(maxsize=None)
def _animeface_srand():
  """animeface's C random-number seeder (nv_srand of its nvxs library), or None."""
  try:
    from animeface import _nvxs  # pylint: disable=g-import-not-at-top
    return ctypes.CDLL(_nvxs.__file__).nv_srand  # dlsym also searches its libnvxs.
  except (ImportError, OSError, AttributeError) as e:
    logging.warning('Cannot seed animeface (%s): hair colours will vary from run to run.', e)
    return None


def seed_animeface(seed: int) -> None:
  """Seeds animeface's hair-colour estimate, which draws from the C library's
  own random generator: unseeded, the same image gets a different colour on
  every call (the nearest name changed for 17% of 2,178 real faces between two
  seeds) and results would depend on the order images come in."""
  srand = _animeface_srand()
  if srand is not None:
    srand(ctypes.c_ulong(seed))


def hair_of_best_face(detector: afd.AnimeFaceDetector, image: Image.Image, seed: int | None = 0):
  """(rgb, likelihood) of animeface's most likely face in one raw image, or
  (None, 0.0). Uses the AFD detector's preprocessing and detect function,
  with animeface's generator reset to `seed` (None: left as it is)."""
  if seed is not None:
    seed_animeface(seed)
  faces = detector._detect(detector.preprocess(image.convert('RGB')))  # pylint: disable=protected-access
  faces = [f for f in faces if f.likelihood >= detector.min_likelihood]
  if not faces:
    return None, 0.0
  best = max(faces, key=lambda f: f.likelihood)
  c = best.hair.color
  return (int(c.r), int(c.g), int(c.b)), float(best.likelihood)


def detect_hair_colours(images_or_paths, detector: afd.AnimeFaceDetector | None = None,
                        palette: dict | None = None, space: str | None = None,
                        progress: bool = False, check: bool = True,
                        seed: int | None = 0) -> list[HairDetection]:
  """HairDetection (name, rgb, likelihood) per image, in input order.

  `images_or_paths`: a folder (sorted like `imageio.list_images`), a list of
  paths or PIL images, or an array [N, H, W, 3]. Unreadable files count as
  images without a face (a warning says how many). `check` runs AFD's
  detector self-check first, so a broken install raises instead of finding
  no face anywhere. `seed` reseeds animeface before every image, so an
  image's colour depends neither on the run nor on the other images.
  """
  detector = detector or afd.AnimeFaceDetector()
  if check:
    afd.self_check(detector)
  names, items = _pil_images(images_or_paths)
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    items = tqdm.tqdm(items, total=len(names), desc='hair colour', unit='img')
  rgbs, likelihoods, unreadable = [], [], 0
  for image in items:
    rgb, likelihood = (None, 0.0) if image is None else hair_of_best_face(detector, image, seed)
    unreadable += image is None
    rgbs.append(rgb)
    likelihoods.append(likelihood)
  if unreadable:
    logging.warning('%d of %d images unreadable (counted as no face).', unreadable, len(names))
  found = [rgb for rgb in rgbs if rgb is not None]
  labels = iter(nearest_colour(np.array(found).reshape(-1, 3), palette, space).tolist())
  return [HairDetection(None if rgb is None else next(labels), rgb, lik)
          for rgb, lik in zip(rgbs, likelihoods)]


@dataclasses.dataclass
class ImageRow:
  file: str
  target: str
  detected: str | None  # None: no face found.
  rgb: tuple[int, int, int] | None
  likelihood: float


@dataclasses.dataclass
class AttributeResult:
  """Hair-colour accuracy of images against their target colours."""
  accuracy: float  # Share of images with a face whose hair colour is the target.
  detection_rate: float  # Share of images with a face.
  num_images: int
  num_detected: int
  num_correct: int
  chance: float  # Majority target's share among images with a face (always guessing it).
  majority: str | None
  balanced_accuracy: float  # Mean over targets of their accuracy (chance: 1 / #targets).
  names: tuple[str, ...]  # Rows (targets) and columns (detections) of `confusion`.
  confusion: np.ndarray  # [len(names), len(names)] counts, images with a face only.
  per_image: list[ImageRow]

  def write_csv(self, path: str | os.PathLike) -> Path:
    """One row per image: file, target, detected (empty: no face), r, g, b, likelihood."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', newline='') as f:
      w = csv.writer(f)
      w.writerow(['file', 'target', 'detected', 'r', 'g', 'b', 'likelihood'])
      for r in self.per_image:
        w.writerow([r.file, r.target, r.detected or '', *(r.rgb or ('', '', '')),
                    f'{r.likelihood:.6f}'])
    return path

  def most_confused(self, k: int = 5) -> list[tuple[str, str, int]]:
    """The k most frequent (target, detected) errors, most frequent first."""
    off = self.confusion * (1 - np.eye(len(self.names), dtype=self.confusion.dtype))
    order = np.argsort(-off, axis=None, kind='stable')[:k]
    pairs = [np.unravel_index(i, off.shape) for i in order]
    return [(self.names[t], self.names[d], int(off[t, d])) for t, d in pairs if off[t, d] > 0]

  def summary(self) -> str:
    return (f'hair-colour accuracy {self.accuracy:.4f} ({self.num_correct}/{self.num_detected} '
            f'images with a face), chance {self.chance:.4f} (always {self.majority!r}), '
            f'balanced accuracy {self.balanced_accuracy:.4f}; detection rate '
            f'{self.detection_rate:.4f} ({self.num_detected}/{self.num_images})')


def check_targets(targets: Sequence[str], num_images: int | None = None) -> list[str]:
  """Canonical target names; ValueError for an unknown name or a length mismatch."""
  targets = list(targets)
  if not targets:
    raise imageio.NoImagesError('No target colour given (empty input).')
  if num_images is not None and num_images != len(targets):
    raise ValueError(f'{num_images} images but {len(targets)} target colours; '
                     'give one target per image.')
  canonical = [canonical_colour(t) if isinstance(t, str) else None for t in targets]
  unknown = sorted({str(t) for t, c in zip(targets, canonical) if c is None})
  if unknown:
    raise ValueError(f'Unknown hair colour(s) {unknown[:5]}; valid: {", ".join(HAIR_COLOURS)} '
                     '(or blond, grey). Drop images whose caption names no single hair colour.')
  return canonical


def score_hair_colours(detections: Sequence[HairDetection], targets: Sequence[str],
                       files: Sequence[str] | None = None) -> AttributeResult:
  """Accuracy, chance level and confusion matrix of detections vs targets."""
  targets = check_targets(targets, len(detections))
  files = [str(i) for i in range(len(targets))] if files is None else [str(f) for f in files]
  index = {n: i for i, n in enumerate(TARGET_COLOURS)}
  confusion = np.zeros((len(TARGET_COLOURS), len(TARGET_COLOURS)), np.int64)
  for d, t in zip(detections, targets):
    if d.name is not None:
      if d.name not in index:
        raise ValueError(f'Detected colour {d.name!r} is no target name ({TARGET_COLOURS}).')
      confusion[index[t], index[d.name]] += 1
  per_target = confusion.sum(1)
  num_detected = int(per_target.sum())
  num_correct = int(np.trace(confusion))
  present = per_target > 0
  rows = [ImageRow(f, t, d.name, d.rgb, d.likelihood)
          for f, t, d in zip(files, targets, detections)]
  return AttributeResult(
      accuracy=num_correct / num_detected if num_detected else 0.0,
      detection_rate=num_detected / len(targets),
      num_images=len(targets), num_detected=num_detected, num_correct=num_correct,
      chance=per_target.max() / num_detected if num_detected else 0.0,
      majority=TARGET_COLOURS[int(per_target.argmax())] if num_detected else None,
      balanced_accuracy=float(np.mean(np.diag(confusion)[present] / per_target[present]))
      if num_detected else 0.0,
      names=TARGET_COLOURS, confusion=confusion, per_image=rows)


def attribute_accuracy(images, target_colours: Sequence[str],
                       csv_path: str | os.PathLike | None = None, progress: bool = False,
                       **detect_kwargs) -> AttributeResult:
  """Hair-colour accuracy of images (folder, paths, PIL images or array) against
  one target colour name per image (see HAIR_COLOURS). Targets are checked
  before the (slow) detection; `detect_kwargs` go to `detect_hair_colours`."""
  names = image_names(images)
  check_targets(target_colours, len(names))
  detections = detect_hair_colours(images, progress=progress, **detect_kwargs)
  result = score_hair_colours(detections, target_colours, names)
  if csv_path is not None:
    result.write_csv(csv_path)
  return result


def captioned_targets(paths: Sequence[Path], captions: Sequence[str]):
  """(paths, targets) of the images whose caption names exactly one hair colour."""
  kept = [(p, hair_colour_from_caption(c)) for p, c in zip(paths, captions)]
  kept = [(p, t) for p, t in kept if t is not None]
  return [p for p, _ in kept], [t for _, t in kept]
