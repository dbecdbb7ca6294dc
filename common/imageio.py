"""Reading image folders and writing images: one place for every package.

Training data (``common.data``), the metrics (``metrics``) and every sampler's
output go through these functions, so a folder is listed, decoded and
converted to RGB the same way everywhere.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile

from common.errors import DataError, MissingFileError, UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')

_RESAMPLE = {
    'nearest': Image.Resampling.NEAREST,
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'lanczos': Image.Resampling.LANCZOS,
    'box': Image.Resampling.BOX,
}

# Truncated JPEGs must fail loudly rather than decode half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class NoImagesError(DataError):
  """A folder holds no (readable) image."""


class NotAFolderError(UserError, NotADirectoryError):
  """A path that should be a folder of images is a file."""


class MixedSizesError(DataError):
  """A folder's images differ in size and no size to resize them to was given."""


def list_images(folder: str | os.PathLike) -> list[Path]:
  """All image files below `folder` (recursive), sorted for determinism."""
  folder = Path(folder)
  if not folder.exists():
    raise MissingFileError(f'Image folder {folder} does not exist.')
  if not folder.is_dir():
    raise NotAFolderError(f'{folder} is not a folder of images.')
  paths = sorted(
      p for p in folder.rglob('*')
      if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
  if not paths:
    raise NoImagesError(
        f'Image folder {folder} holds no image file '
        f'(looked for {", ".join(IMAGE_EXTENSIONS)}, recursively).')
  return paths


def _square_crop(img: Image.Image) -> Image.Image:
  w, h = img.size
  if w == h:
    return img
  s = min(w, h)
  left, top = (w - s) // 2, (h - s) // 2
  return img.crop((left, top, left + s, top + s))


def read_image(path: str | os.PathLike,
               size: int | None = None,
               resample: str = 'bicubic',
               center_crop: bool = True) -> np.ndarray:
  """Decodes one image to uint8 RGB [H, W, 3].

  Grayscale, palette and RGBA images are converted to RGB (alpha composited
  onto white, the usual background of anime-face crops). With `size`, the
  image is centre-cropped to a square (if `center_crop`) and resized to
  size x size. Raises OSError (or PIL's UnidentifiedImageError, a subclass)
  for unreadable or truncated files.
  """
  if resample not in _RESAMPLE:
    raise ValueError(f'Unknown resample {resample!r}; choose from {sorted(_RESAMPLE)}.')
  with Image.open(path) as img:
    img.load()  # Forces a full decode so truncation is detected here.
    if img.mode in ('RGBA', 'LA') or (img.mode == 'P' and 'transparency' in img.info):
      img = img.convert('RGBA')
      background = Image.new('RGBA', img.size, (255, 255, 255, 255))
      img = Image.alpha_composite(background, img)
    img = img.convert('RGB')
    if size is not None:
      if center_crop:
        img = _square_crop(img)
      if img.size != (size, size):
        img = img.resize((size, size), _RESAMPLE[resample])
    return np.asarray(img, dtype=np.uint8)


def iter_images(paths: Sequence[Path], size: int | None = None,
                resample: str = 'bicubic', center_crop: bool = True,
                num_threads: int = 8) -> Iterator[tuple[Path, np.ndarray | None]]:
  """Yields (path, image or None if unreadable) in order, decoding in threads."""

  def load(p):
    try:
      return read_image(p, size, resample, center_crop)
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three.
      logging.debug('Skipping unreadable image %s: %s', p, e)
      return None

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    # map() keeps order; chunks bound memory for huge folders.
    chunk = 1024
    for i in range(0, len(paths), chunk):
      part = paths[i:i + chunk]
      yield from zip(part, pool.map(load, part))


def load_images(folder: str | os.PathLike,
                size: int | None = None,
                max_images: int | None = None,
                resample: str = 'bicubic',
                center_crop: bool = True,
                progress: bool = False) -> tuple[np.ndarray, list[Path]]:
  """Loads a folder into one uint8 array [N, H, W, 3].

  Unreadable files are skipped and counted in the log. Without `size`, all
  images must share one size (a clear error names two that differ).

  Returns:
    (images, paths of the images kept).
  """
  paths = list_images(folder)
  if max_images is not None:
    paths = paths[:max_images]
  items: Iterable = iter_images(paths, size, resample, center_crop)
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    items = tqdm.tqdm(items, total=len(paths), desc=f'reading {folder}', unit='img')
  images, kept, skipped = [], [], []
  for path, img in items:
    if img is None:
      skipped.append(path)
      continue
    if images and img.shape != images[0].shape:
      raise MixedSizesError(
          f'Images in {folder} have different sizes ({kept[0].name}: '
          f'{images[0].shape[:2]}, {path.name}: {img.shape[:2]}).')
    images.append(img)
    kept.append(path)
  if skipped:
    logging.warning('Skipped %d unreadable image file(s) in %s (first: %s).',
                    len(skipped), folder, skipped[0])
  if not images:
    raise NoImagesError(
        f'Image folder {folder} has no readable image: all {len(paths)} '
        'file(s) failed to decode.')
  return np.stack(images), kept


def read_caption_table(path: str | os.PathLike) -> list[tuple[str, str]]:
  """(file, caption) rows of a TSV whose header names the columns `file` and `caption`."""
  import csv  # pylint: disable=g-import-not-at-top
  table = Path(path)
  if not table.is_file():
    raise MissingFileError(f'Captions file {table} not found (a TSV with columns file, caption).')
  with open(table, newline='', encoding='utf-8') as f:
    rows = list(csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE))
  header = [h.strip().lower() for h in rows[0]] if rows else []
  if 'file' not in header or 'caption' not in header:
    raise DataError(f'{table}: expected a header row "file<TAB>caption", got {rows[:1]}.')
  i_file, i_caption = header.index('file'), header.index('caption')
  return [(row[i_file].strip(), row[i_caption] if i_caption < len(row) else '')
          for row in rows[1:] if row and row[i_file].strip()]


def to_unit(images_uint8):
  """uint8 images (numpy or jax) -> float32 in [-1, 1], the range every model here works in;
  `to_uint8` is the inverse."""
  return images_uint8.astype('float32') / 127.5 - 1.0


def to_uint8(images: np.ndarray, value_range=(-1.0, 1.0)) -> np.ndarray:
  """Floats in `value_range` to uint8, clipping outside values."""
  lo, hi = value_range
  x = (np.asarray(images, np.float32) - lo) / (hi - lo)
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2,
              pad_value: int = 255) -> np.ndarray:
  """Tiles uint8 [N, H, W, C] images into one [rows*H', cols*W', C] image."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  n, h, w, c = images.shape
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  nrow = int(math.ceil(n / ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c),
                 pad_value, images.dtype)
  for i in range(n):
    r, k = divmod(i, ncol)
    y, x = pad + r * (h + pad), pad + k * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def captioned_grid(images: np.ndarray, captions: Sequence[str], ncol: int,
                   min_size: int = 64, line_height: int = 14) -> np.ndarray:
  """One row of `ncol` images per caption, the caption written above its row.

  Images smaller than `min_size` are enlarged (nearest neighbour) so the grid stays legible.
  """
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  images = np.asarray(images)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  scale = max(1, min_size // images.shape[1])
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  rows = [make_grid(images[r * ncol:(r + 1) * ncol], ncol) for r in range(len(captions))]
  width = max([r.shape[1] for r in rows] + [6 * len(c) + 6 for c in captions])
  out = []
  for row, caption in zip(rows, captions):
    label = Image.new('RGB', (width, line_height), 'white')
    ImageDraw.Draw(label).text((2, 1), caption, fill='black')
    out += [np.asarray(label), np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)),
                                      constant_values=255)]
  return np.concatenate(out, axis=0)


def save_image(image: np.ndarray, path: str | os.PathLike, quality: int = 95) -> None:
  """Writes one uint8 [H, W, 3] (or [H, W, 1]) image; format from the suffix."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path, quality=quality)


def save_grid(images: np.ndarray, path: str | os.PathLike, ncol: int | None = None) -> None:
  save_image(make_grid(images, ncol), path)


def write_numbered(images: np.ndarray, folder: str | os.PathLike,
                   start: int = 1, ext: str = 'jpg', quality: int = 95) -> list[Path]:
  """Writes images as start.ext, start+1.ext, ... (the HW6 `1.jpg … N.jpg`)."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, img in enumerate(np.asarray(images)):
    p = folder / f'{start + i}.{ext}'
    save_image(img, p, quality)
    paths.append(p)
  return paths
