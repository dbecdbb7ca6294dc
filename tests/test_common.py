"""Shared plumbing: image folders, batch order, checkpoints, config checks, augmentation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from common import augment, checkpoint, data, imageio
from common import config as config_lib
from common.errors import ConfigError, DataError
from conftest import shared_path


@pytest.fixture
def mixed_folder(tmp_path):
  """Every kind of file a scraped image folder holds."""
  root = tmp_path / 'imgs'
  (root / 'sub' / 'deeper').mkdir(parents=True)
  rng = np.random.RandomState(0)
  rgb = rng.randint(0, 255, (20, 30, 3), np.uint8)
  Image.fromarray(rgb).save(root / 'a.jpg')
  Image.fromarray(rgb[..., 0]).save(root / 'sub' / 'gray.png')                   # L
  Image.fromarray(np.dstack([rgb, np.full((20, 30), 128, np.uint8)])).save(root / 'sub' / 'rgba.png')
  Image.fromarray(rgb).convert('P').save(root / 'sub' / 'deeper' / 'palette.png')  # P
  Image.fromarray(rgb).save(root / 'sub' / 'deeper' / 'c.webp')
  (root / 'broken.jpg').write_bytes(b'\xff\xd8\xff garbage')
  full = root / 'a.jpg'
  (root / 'truncated.jpg').write_bytes(full.read_bytes()[:len(full.read_bytes()) // 2])
  (root / 'notes.txt').write_text('not an image')
  return root


def test_image_folder_recursive_conversion_and_skipping(mixed_folder, caplog):
  images, paths = imageio.load_images(mixed_folder, size=16)
  assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
  assert sorted(p.name for p in paths) == ['a.jpg', 'c.webp', 'gray.png', 'palette.png', 'rgba.png']
  assert 'Skipped 2 unreadable image file(s)' in caplog.text
  gray = images[[p.name for p in paths].index('gray.png')]
  assert np.array_equal(gray[..., 0], gray[..., 1])  # Grayscale replicated to RGB.


def test_rgba_is_composited_on_white(tmp_path):
  Image.new('RGBA', (8, 8), (0, 0, 0, 0)).save(tmp_path / 'clear.png')
  assert (imageio.read_image(tmp_path / 'clear.png') == 255).all()


def test_center_crop_and_resize(tmp_path):
  img = np.zeros((10, 20, 3), np.uint8)
  img[:, 5:15] = 255  # The central square is white.
  Image.fromarray(img).save(tmp_path / 'wide.png')
  out = imageio.read_image(tmp_path / 'wide.png', size=4, resample='nearest')
  assert out.shape == (4, 4, 3) and (out == 255).all()


def test_mixed_sizes_without_resize_is_an_error(tmp_path):
  imageio.save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / 'a.png')
  imageio.save_image(np.zeros((9, 9, 3), np.uint8), tmp_path / 'b.png')
  with pytest.raises(ValueError, match='different sizes'):
    imageio.load_images(tmp_path)


def test_missing_and_empty_folders(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    imageio.list_images(tmp_path / 'nope')
  (tmp_path / 'e').mkdir()
  (tmp_path / 'e' / 'readme.md').write_text('x')
  with pytest.raises(imageio.NoImagesError, match='holds no image file'):
    imageio.list_images(tmp_path / 'e')


def test_write_numbered_and_grid(tmp_path):
  imgs = np.random.RandomState(0).randint(0, 255, (5, 6, 6, 3), np.uint8)
  paths = imageio.write_numbered(imgs, tmp_path / 'out', ext='png')
  assert [p.name for p in paths] == ['1.png', '2.png', '3.png', '4.png', '5.png']
  np.testing.assert_array_equal(np.asarray(Image.open(paths[2])), imgs[2])  # PNG is lossless.
  grid = imageio.make_grid(imgs, ncol=3, pad=1)
  assert grid.shape == (2 * 7 + 1, 3 * 7 + 1, 3)
  np.testing.assert_array_equal(grid[8:14, 1:7], imgs[3])
  np.testing.assert_array_equal(imageio.to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])), [0, 128, 255, 255])


def test_folder_source_on_shared_faces():
  c = data.get_config()
  c.path = str(shared_path('data', 'anime_faces_mlds96', 'images'))
  c.image_size = 32
  c.max_images = 50
  images = data.load_dataset(c)
  assert images.shape == (50, 32, 32, 3)
  assert 40 < images.mean() < 220  # Real pictures, not blank.


def test_builtin_digits():
  c = data.get_config()
  c.source = 'digits'
  c.image_size = 16
  images = data.load_dataset(c)
  assert images.shape == (1797, 16, 16, 3)
  assert images.min() < 30 and images.max() > 240  # Dark ink on white.


def test_tfds_not_prepared_is_a_clear_error(tmp_path):
  c = data.get_config()
  c.source, c.tfds_name, c.tfds_data_dir = 'tfds', 'cifar10', str(tmp_path)
  with pytest.raises(FileNotFoundError, match=r'cifar10.*not prepared.*tfds build cifar10'):
    data.load_dataset(c)


def test_batch_order_is_deterministic_and_resumable():
  images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
  it = data.BatchIterator(images, 4, seed=3)
  first = [next(it)[:, 0, 0, 0].tolist() for _ in range(6)]
  # Every epoch is a permutation of the data set.
  flat = sum(first, [])
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
  resumed = data.BatchIterator(images, 4, seed=3, step=4)
  assert [next(resumed)[:, 0, 0, 0].tolist() for _ in range(2)] == first[4:]
  other = data.BatchIterator(images, 4, seed=4)
  assert [next(other)[:, 0, 0, 0].tolist() for _ in range(6)] != first


def test_config_checks_name_the_key():
  ref = ml_collections.ConfigDict({'a': 1, 'sub': {'b': 2}})
  bad = ml_collections.ConfigDict({'a': 1, 'sub': {'c': 2}})
  with pytest.raises(KeyError, match=r"config.sub.c.*valid keys here: b"):
    config_lib.check_keys(bad, ref)
  with pytest.raises(ValueError, match=r"data.source='ftp' is not one of"):
    c = data.get_config()
    c.source = 'ftp'
    data.validate(c)
  with pytest.raises(ValueError, match='res must be a power of two, got 48'):
    config_lib.check_power_of_two(48, 'res')


def test_checkpointer_ignores_and_cleans_killed_saves(tmp_path):
  state = {'w': jnp.arange(4.0), 'step': jnp.array(3)}
  ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, async_save=False)
  ckpt.save(3, state)
  ckpt.close()
  # What kill -9 during the save of step 7 leaves behind.
  leftover = tmp_path / 'checkpoints' / '7.orbax-checkpoint-tmp-1234'
  leftover.mkdir()
  (leftover / 'partial').write_bytes(b'\0' * 10)
  ckpt = checkpoint.Checkpointer(tmp_path, save_every=1)
  assert not leftover.exists()
  assert ckpt.latest_step() == 3
  restored = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
  ckpt.close()
  np.testing.assert_array_equal(restored['w'], np.arange(4.0))


def test_checkpointer_keeps_last_k(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=2, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, {'x': jnp.full((2,), step)})
  ckpt.close()
  assert ckpt.all_steps() == [2, 3]


def test_preemption_guard_on_sigterm():
  import os, signal  # pylint: disable=g-import-not-at-top,multiple-imports
  with checkpoint.PreemptionGuard() as guard:
    assert not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.should_stop(2)
  # `!=`: a bound method is a new object on every access (`is not` could never fail).
  assert signal.getsignal(signal.SIGTERM) != guard._handler  # pylint: disable=protected-access
  assert signal.getsignal(signal.SIGINT) != guard._handler  # pylint: disable=protected-access


def test_augmentation():
  c = augment.get_config()
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (8, 16, 16, 3)), jnp.float32)
  assert augment.augment(jax.random.PRNGKey(0), x, c) is x  # Disabled by default.
  c.enabled = True
  y = augment.augment(jax.random.PRNGKey(0), x, c)
  assert y.shape == x.shape and float(jnp.abs(y).max()) <= 1.0
  assert not np.allclose(y, x)
  # Pure flips: each image is itself or its mirror.
  c.rotation_degrees = c.brightness = c.contrast = 0.0
  y = np.asarray(augment.augment(jax.random.PRNGKey(1), x, c))
  mirrored = [np.allclose(y[i], x[i, :, ::-1]) for i in range(8)]
  same = [np.allclose(y[i], x[i]) for i in range(8)]
  assert all(m or s for m, s in zip(mirrored, same)) and any(mirrored) and any(same)
  # A 90-degree rotation matches numpy's rot90 (checks the geometry and direction).
  r = augment.rotate(x[0], jnp.deg2rad(90.0))
  np.testing.assert_allclose(r, np.rot90(np.asarray(x[0]), k=1, axes=(0, 1)), atol=1e-4)


def test_read_only_checkpointer_leaves_a_running_save_alone(tmp_path):
  assert checkpoint.Checkpointer(tmp_path / 'none', read_only=True).latest_step() is None
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
  ckpt.save(2, {'x': jnp.ones(3)})
  ckpt.close()
  in_progress = tmp_path / 'checkpoints' / '4.orbax-checkpoint-tmp-99'
  in_progress.mkdir()
  reader = checkpoint.Checkpointer(tmp_path, read_only=True)
  assert reader.latest_step() == 2 and in_progress.exists()
  np.testing.assert_array_equal(reader.restore({'x': jnp.zeros(3)})['x'], np.ones(3))
  reader.close()
  assert in_progress.exists()
  assert not (tmp_path / 'none').exists()


def test_exclude_captions_leaves_matching_images_out(tmp_path):
  colours = {'1.png': 'green long hair and red eyes', '2.png': 'blonde hair and green eyes',
             '3.png': 'long green hair', '4.png': 'black hair'}
  for i, name in enumerate(colours):
    imageio.save_image(np.full((8, 8, 3), 40 * i, np.uint8), tmp_path / name)
  (tmp_path / 'captions.tsv').write_text(
      'file\tcaption\n' + ''.join(f'{f}\t{c}\n' for f, c in colours.items()))
  c = data.get_config()
  c.path, c.image_size = str(tmp_path), 8
  c.exclude_captions = r'green[a-z ]* hair'
  images, captions = data.load_captioned_dataset(c)
  assert captions == ['blonde hair and green eyes', 'black hair']  # Green eyes stay.
  assert np.array_equal(data.load_dataset(c), images)  # Unconditional training: the same set.
  c.exclude_captions = '('
  with pytest.raises(ConfigError, match='exclude_captions'):
    data.load_dataset(c)
  c.exclude_captions = 'hair'
  with pytest.raises(DataError, match='leaves out every image'):
    data.load_dataset(c)


# --- Captions: keyed by path relative to the image folder ------------------------------------

def _captioned_folder(root, files, rows):
  for i, name in enumerate(files):
    imageio.save_image(np.full((8, 8, 3), 30 * i, np.uint8), root / name)
  (root / 'captions.tsv').write_text('file\tcaption\n' + ''.join(f'{f}\t{c}\n' for f, c in rows))
  c = data.get_config()
  c.path, c.image_size = str(root), 8
  return c


def test_captions_are_keyed_by_relative_path(tmp_path):
  """Two files of one name in different subfolders get their own rows' captions."""
  c = _captioned_folder(tmp_path, ['a/1.png', 'b/1.png', '2.png'],
                        [('a/1.png', 'red hair'), ('b/1.png', 'blue hair'), ('2.png', 'black hair')])
  images, captions = data.load_captioned_dataset(c)
  assert captions == ['black hair', 'red hair', 'blue hair']  # 2.png, a/1.png, b/1.png.
  assert [int(x) for x in images[:, 0, 0, 0]] == [60, 0, 30]   # Each with its own image.
  # A table beside the image folder may name the files from its own folder.
  (tmp_path / 'images').mkdir()
  for name in ('a', 'b', '2.png'):
    (tmp_path / name).rename(tmp_path / 'images' / name)
  (tmp_path / 'captions.tsv').write_text('file\tcaption\nimages/a/1.png\tred hair\n'
                                         'images/b/1.png\tblue hair\n')
  c.path = str(tmp_path / 'images')
  assert data.load_captioned_dataset(c)[1] == ['red hair', 'blue hair']


def test_basename_captions_still_work_where_unique(tmp_path):
  c = _captioned_folder(tmp_path, ['x/1.png', 'y/z/2.png'], [('1.png', 'one'), ('2.png', 'two')])
  assert data.load_captioned_dataset(c)[1] == ['one', 'two']


def test_a_basename_row_shared_by_two_files_is_an_error_naming_both(tmp_path):
  c = _captioned_folder(tmp_path, ['a/1.png', 'b/1.png', '2.png'],
                        [('1.png', 'red hair'), ('2.png', 'black hair')])
  with pytest.raises(DataError) as e:
    data.load_captioned_dataset(c)
  assert str(tmp_path / 'a' / '1.png') in str(e.value)
  assert str(tmp_path / 'b' / '1.png') in str(e.value) and "'1.png'" in str(e.value)
  # A top-level file of that name does not make the row mean both.
  c = _captioned_folder(tmp_path / 'top', ['1.png', 'sub/1.png'], [('1.png', 'red hair')])
  with pytest.raises(DataError, match='sub/1.png'):
    data.load_captioned_dataset(c)
  # Rows by relative path: no ambiguity.
  c = _captioned_folder(tmp_path / 'both', ['1.png', 'sub/1.png'],
                        [('1.png', 'red hair'), ('sub/1.png', 'blue hair')])
  assert data.load_captioned_dataset(c)[1] == ['red hair', 'blue hair']


# --- The driver: finish only after a completed run ---------------------------------------------

def _counting_experiment(stop_at=None):
  """A tiny Experiment (a counter state) recording its finish calls; SIGTERM after `stop_at`."""
  import itertools, os, signal  # pylint: disable=g-import-not-at-top,multiple-imports
  import flax  # pylint: disable=g-import-not-at-top
  from common import experiment, loop  # pylint: disable=g-import-not-at-top

  @flax.struct.dataclass
  class State:
    step: jax.Array
    w: jax.Array

  class Counting(experiment.Experiment):
    name = 'counter'

    def __init__(self, config):
      super().__init__(config)
      self.finished = []

    def init_state(self):
      return State(step=jnp.zeros((), jnp.int32), w=jnp.zeros((4,)))

    def param_trees(self, state):
      return {self.name: {'bias': state.w}}  # A name the default params rules match.

    def make_step(self, shardings):
      step = lambda state, batch: (state.replace(step=state.step + 1, w=state.w + batch),
                                   {'loss': jnp.mean(state.w)})
      return loop.jit_step(step, self.mesh, shardings)

    def batches(self, start):
      return (np.full((4,), s, np.float32) for s in itertools.count(start))

    def hooks(self, writer):
      kill = lambda step, state: step == stop_at and os.kill(os.getpid(), signal.SIGTERM)
      return [loop.Hook(1, kill, 'preempting')] if stop_at else []

    def finish(self, state, ckpt, writer, start):
      self.finished.append(int(state.step))
      return state

  config = ml_collections.ConfigDict({'train': dict(
      batch_size=4, num_steps=8, log_every=2, checkpoint_every=4, keep_checkpoints=2,
      async_checkpoint=False)})
  return Counting(config)


def test_a_preempted_run_writes_its_checkpoint_and_does_not_finish(tmp_path):
  from common import experiment  # pylint: disable=g-import-not-at-top
  exp = _counting_experiment(stop_at=3)
  state = experiment.train_and_evaluate(exp, tmp_path)
  assert int(state.step) == 4 and exp.finished == []  # SIGTERM in step 3's hooks: saved at 4.
  assert checkpoint.Checkpointer(tmp_path, 1, read_only=True).latest_step() == 4
  resumed = _counting_experiment()
  state = experiment.train_and_evaluate(resumed, tmp_path)
  assert int(state.step) == 8 and resumed.finished == [8]  # The rerun completes and finishes.
  np.testing.assert_array_equal(np.asarray(state.w), np.full(4, sum(range(8)), np.float32))
  # Stopped at the last step: the run is complete, but finish waits for the rerun.
  last = _counting_experiment(stop_at=8)
  assert int(experiment.train_and_evaluate(last, tmp_path / 'last').step) == 8
  assert last.finished == []
  rerun = _counting_experiment()
  experiment.train_and_evaluate(rerun, tmp_path / 'last')
  assert rerun.finished == [8]


def test_a_completed_run_finishes(tmp_path):
  from common import experiment  # pylint: disable=g-import-not-at-top
  exp = _counting_experiment()
  assert int(experiment.train_and_evaluate(exp, tmp_path).step) == 8
  assert exp.finished == [8]
