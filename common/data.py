"""Image data sets as uint8 arrays, and a deterministic, resumable batch order.

Sources (``config.data.source``):
  folder  a folder of images (recursive; jpg/png/webp/bmp), resized to
          ``image_size``; unreadable files are skipped and counted.
  digits  the built-in demo set: scikit-learn's 1,797 real 8x8 handwritten
          digits (shipped inside the wheel, no download), upscaled.
  tfds    a TensorFlow Datasets name (e.g. ``cifar10``) already prepared in
          ``tfds_data_dir``; nothing is downloaded at run time.

Every source is decoded once into host memory (71k 96x96 faces are 2 GB).
The batch for step ``s`` depends only on (seed, s), so a run resumed at step
``s`` continues exactly the data order of an uninterrupted run.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path, PurePosixPath

import jax
import ml_collections
import numpy as np
from PIL import Image

from common import config as config_lib
from common import imageio
from common.errors import ConfigError, DataError, MissingFileError

SOURCES = ('folder', 'digits', 'tfds')


def get_config() -> ml_collections.ConfigDict:
  """Defaults for the ``data`` block of every experiment config."""
  c = ml_collections.ConfigDict()
  c.source = 'folder'
  c.path = ''              # folder source: the image folder.
  c.image_size = 64
  c.resize = True          # False: images must already be image_size (else an error).
  c.center_crop = True     # Non-square images are centre-cropped before resizing.
  c.max_images = 0         # 0 = all.
  c.tfds_name = ''
  c.tfds_split = 'train'
  c.tfds_data_dir = ''
  c.captions = ''          # Captioned sets: a TSV (file<TAB>caption); '' = captions.tsv in
                           # the image folder or its parent.
  c.exclude_captions = ''  # A regex: images whose caption it matches (re.search, any case)
                           # are left out, e.g. r'green (long |short )?hair' to keep a
                           # concept from a base model. Only captioned images are kept.
  return c


def validate(c: ml_collections.ConfigDict, prefix: str = 'data') -> None:
  config_lib.check_keys(c, get_config(), prefix)
  config_lib.check_choice(c.source, SOURCES, f'{prefix}.source')
  config_lib.check_positive(c.image_size, f'{prefix}.image_size')
  if c.max_images < 0:
    raise ConfigError(f'{prefix}.max_images must be >= 0 (0 = all), got {c.max_images}.')
  if c.source == 'folder' and not c.path:
    raise ConfigError(f"{prefix}.path must name an image folder when {prefix}.source='folder'.")
  if c.source == 'tfds' and not c.tfds_name:
    raise ConfigError(f"{prefix}.tfds_name must be set when {prefix}.source='tfds'.")
  if c.exclude_captions:
    if c.source != 'folder':
      raise ConfigError(f"{prefix}.exclude_captions needs {prefix}.source='folder' with captions.")
    try:
      re.compile(c.exclude_captions)
    except re.error as e:
      raise ConfigError(f'{prefix}.exclude_captions={c.exclude_captions!r} is not a regular '
                        f'expression: {e}.') from None


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
  if images.shape[1:3] == (size, size):
    return images
  return np.stack([
      np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
      for im in images])


def _load_digits(size: int) -> np.ndarray:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits().images  # [1797, 8, 8], ink 0..16 on 0 background.
  gray = np.rint(255.0 - digits * (255.0 / 16.0)).astype(np.uint8)  # Dark ink on white.
  rgb = np.repeat(gray[..., None], 3, axis=-1)
  return _resize_all(rgb, size)


def _load_tfds(c: ml_collections.ConfigDict) -> np.ndarray:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    ds = tfds.load(c.tfds_name, split=c.tfds_split, data_dir=c.tfds_data_dir or None,
                   download=False, batch_size=-1)
  except Exception as e:  # tfds raises several types for "not prepared".
    raise MissingFileError(
        f'TFDS dataset {c.tfds_name!r} (split {c.tfds_split!r}) is not prepared in '
        f'{c.tfds_data_dir or "the default TFDS data dir (~/tensorflow_datasets)"}. '
        f'Prepare it on a machine with network access with `tfds build {c.tfds_name} '
        f'--data_dir=DIR` and set data.tfds_data_dir=DIR. ({e})') from e
  images = tfds.as_numpy(ds)['image']
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return _resize_all(images.astype(np.uint8), c.image_size)


def load_dataset(c: ml_collections.ConfigDict) -> np.ndarray:
  """Loads the configured source into uint8 [N, image_size, image_size, 3]."""
  validate(c)
  max_images = c.max_images or None
  if c.exclude_captions:
    return load_captioned_dataset(c)[0]
  if c.source == 'folder':
    try:
      images, _ = imageio.load_images(
          c.path, size=c.image_size if c.resize else None, max_images=max_images,
          center_crop=c.center_crop, progress=jax.process_index() == 0)
    except imageio.MixedSizesError as e:
      raise DataError(f'{e} Pass --config.data.resize=True to resize them to '
                      f'data.image_size={c.image_size}.') from None
    if images.shape[1:3] != (c.image_size, c.image_size):
      raise DataError(
          f'Images in {c.path} are {images.shape[1]}x{images.shape[2]} but the config '
          f'says data.image_size={c.image_size}: pass --config.data.image_size='
          f'{images.shape[1]} or --config.data.resize=True.')
  elif c.source == 'digits':
    images = _load_digits(c.image_size)[:max_images]
  else:
    images = _load_tfds(c)[:max_images]
  where = {'folder': c.path, 'tfds': f'TFDS {c.tfds_name}'}.get(c.source, 'the built-in digits')
  logging.info('Loaded %d images of %dx%d from %s.', len(images), images.shape[1],
               images.shape[2], where)
  return images


DIGIT_NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')


def captions_file(c: ml_collections.ConfigDict) -> Path:
  if c.captions:
    return Path(c.captions)
  for candidate in (Path(c.path) / 'captions.tsv', Path(c.path).parent / 'captions.tsv'):
    if candidate.is_file():
      return candidate
  raise MissingFileError(
      f'No captions.tsv in {c.path} or its parent; set data.captions to the captions file.')


def caption_paths(images: list[Path], folder: str | Path,
                  table: str | Path) -> dict[Path, str]:
  """{image: caption} of the `images` below `folder` that `table` (a file<TAB>caption TSV)
  captions, in the images' order.

  A row's `file` names an image by its path relative to `folder` (or to the table's own
  folder, for a table beside an images/ folder), e.g. `a/1.png`; a bare name (`1.png`) that
  is no such path names the image of that name in any subfolder, and is an error
  (DataError, naming the files) where several images have that name: key those rows by
  relative path.
  """
  folder, table = Path(folder), Path(table)
  rows = dict((PurePosixPath(f.replace('\\', '/')).as_posix(), text)
              for f, text in imageio.read_caption_table(table))
  by_name: dict[str, list[Path]] = {}
  for path in images:
    by_name.setdefault(path.name, []).append(path)
  # Paths relative to the table's folder: the folder's own prefix there, if it has one.
  base, table_dir = folder.resolve(), table.parent.resolve()
  prefix = base.relative_to(table_dir).as_posix() + '/' if table_dir in base.parents else None
  out = {}
  for path in images:
    rel = path.relative_to(folder).as_posix()
    key = next((k for k in (rel, prefix and prefix + rel) if k and k in rows), None)
    if key is None and path.name in rows:
      same = by_name[path.name]
      if len(same) > 1:
        raise DataError(
            f'{table}: the row {path.name!r} names a file name that {len(same)} images below '
            f'{folder} share ({", ".join(str(p) for p in same[:4])}); name each by its path '
            f'relative to {folder} (e.g. {same[0].relative_to(folder).as_posix()!r}).')
      key = path.name
    if key is not None:
      out[path] = rows[key]
  return out


def load_captioned_dataset(c: ml_collections.ConfigDict) -> tuple[np.ndarray, list[str]]:
  """Images with their captions: a folder's captioned files, or the digits as "digit seven"."""
  validate(c)
  if c.source == 'digits':
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    labels = load_digits().target[:c.max_images or None]
    return _load_digits(c.image_size)[:len(labels)], [f'digit {DIGIT_NAMES[i]}' for i in labels]
  if c.source != 'folder':
    raise ConfigError(f"Captions need data.source='folder' (with a captions TSV) or 'digits', "
                     f'not {c.source!r}.')
  table = captions_file(c)
  captions = caption_paths(imageio.list_images(c.path), c.path, table)
  paths = list(captions)
  if not paths:
    raise DataError(f'No image in {c.path} has a caption in {table}.')
  if c.exclude_captions:
    excluded = re.compile(c.exclude_captions, re.IGNORECASE)
    kept_paths = [p for p in paths if not excluded.search(captions[p])]
    logging.info('data.exclude_captions=%r leaves out %d of %d captioned images.',
                 c.exclude_captions, len(paths) - len(kept_paths), len(paths))
    if not kept_paths:
      raise DataError(f'data.exclude_captions={c.exclude_captions!r} leaves out every image.')
    paths = kept_paths
  paths = paths[:c.max_images or None]
  images, kept = [], []
  for path, img in imageio.iter_images(paths, c.image_size if c.resize else None,
                                       center_crop=c.center_crop):
    if img is not None:
      images.append(img)
      kept.append(captions[path])
  if not images:
    raise imageio.NoImagesError(f'None of the captioned images in {c.path} could be read.')
  images = np.stack(images)
  if images.shape[1:3] != (c.image_size, c.image_size):
    raise DataError(f'Images in {c.path} are {images.shape[1]}x{images.shape[2]} but the '
                    f'config says data.image_size={c.image_size}: pass '
                    '--config.data.resize=True.')
  logging.info('Loaded %d captioned images from %s.', len(images), c.path)
  return images, kept


class BatchIterator:
  """Reshuffled epochs; the batch at step s is a pure function of (seed, s).

  Each process gets its own rows of the global batch, so on several hosts the
  union over processes is the global batch. `images` may be a pytree of arrays
  with the same first dimension (images with their captions or labels).
  """

  def __init__(self, images, global_batch_size: int, seed: int, step: int = 0):
    self.images = images
    self.num_examples = len(jax.tree.leaves(images)[0])
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.step = step
    n_proc = jax.process_count()
    if global_batch_size % n_proc:
      raise ConfigError(f'batch_size={global_batch_size} does not divide over {n_proc} processes.')
    self.local_batch_size = global_batch_size // n_proc
    self._perm_cache: dict[int, np.ndarray] = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perm_cache:
      if len(self._perm_cache) > 2:
        self._perm_cache.clear()
      rng = np.random.default_rng([self.seed, epoch])
      self._perm_cache[epoch] = rng.permutation(self.num_examples)
    return self._perm_cache[epoch]

  def indices(self, step: int) -> np.ndarray:
    """Dataset indices of this process's rows of the global batch at `step`."""
    n = self.num_examples
    start = step * self.global_batch_size + jax.process_index() * self.local_batch_size
    pos = start + np.arange(self.local_batch_size)
    epochs, offsets = np.divmod(pos, n)
    return np.array([self._permutation(e)[o] for e, o in zip(epochs, offsets)])

  def __iter__(self):
    return self

  def __next__(self):
    idx = self.indices(self.step)
    batch = jax.tree.map(lambda x: x[idx], self.images)
    self.step += 1
    return batch
