"""AFD: the animeface detector with its preprocessing, on the shared face sets."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from common import imageio
from conftest import shared_path
from metrics import __main__ as cli
from metrics import afd


@pytest.fixture(scope='module')
def detector():
  return afd.AnimeFaceDetector()


@pytest.fixture(scope='module')
def getchu500():
  folder = shared_path('data', 'anime_faces_getchu64', 'images')
  return imageio.load_images(folder, max_images=500)[0]


def test_self_check_passes_on_this_install(detector):
  afd.self_check(detector)
  assert detector.likelihoods(afd.synthetic_face(128))[0] > 0.9


def test_self_check_catches_a_broken_detector(monkeypatch):
  broken = afd.AnimeFaceDetector()
  monkeypatch.setattr(broken, '_detect', lambda image: [])  # What Pillow 12+ does.
  with pytest.raises(afd.DetectorBrokenError, match='Pillow'):
    afd.self_check(broken)
  with pytest.raises(afd.DetectorBrokenError):  # Never a silent AFD = 0.
    afd.afd(np.zeros((2, 64, 64, 3), np.uint8), detector=broken, progress=False)

  class AlwaysFace:
    name = 'always'
    likelihoods = staticmethod(lambda image: [1.0])
  with pytest.raises(afd.DetectorBrokenError, match='blank image: 1 found'):
    afd.self_check(AlwaysFace())


def test_preprocessing_upscales_small_images_only():
  small = afd.pad_and_upscale(Image.new('RGB', (64, 64)))
  assert small.size == (192, 192)  # 2x to 128, plus 25% white on each side.
  assert small.getpixel((0, 0)) == (255, 255, 255)
  assert afd.pad_and_upscale(Image.new('RGB', (96, 96))).size == (144, 144)  # Border only.
  assert afd.pad_and_upscale(Image.new('RGB', (40, 40))).size == (180, 180)  # 3x.
  assert afd.pad_and_upscale(Image.new('RGB', (512, 512)), border=0).size == (512, 512)
  assert afd.pad_and_upscale(Image.new('RGB', (64, 64)), min_size=0, border=0).size == (64, 64)


def test_getchu_faces_detected(getchu500, detector):
  r = afd.afd(getchu500, detector=detector, progress=False)
  assert r.num_images == 500
  assert r.rate >= 0.90, r.rate  # Measured 98% (26% without the preprocessing).


def test_noise_and_blur_not_detected(getchu500, detector):
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (200, 64, 64, 3), dtype=np.uint8)
  assert afd.afd(noise, detector=detector, progress=False).rate <= 0.05
  blurred = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(4)))
                      for im in getchu500[:200]])
  assert afd.afd(blurred, detector=detector, progress=False).rate <= 0.05


def test_full_size_portraits_detected(detector):
  r = afd.afd(shared_path('data', 'detector_samples', 'tadne_tiles'), detector=detector,
              progress=False)
  assert r.num_images == 36 and r.rate >= 0.8, r.rate


def test_folder_csv_and_cli(tmp_path, getchu500, capsys):
  folder = tmp_path / 'fake'
  imageio.write_numbered(getchu500[:4], folder, ext='png')
  imageio.write_numbered(np.full((2, 64, 64, 3), 128, np.uint8), folder, start=5, ext='png')
  (folder / 'broken.jpg').write_bytes(b'not an image')
  r = afd.afd(folder, csv_path=tmp_path / 'afd.csv', progress=False)
  assert r.num_images == 6  # The unreadable file is skipped.
  with open(tmp_path / 'afd.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6 and set(rows[0]) == {'file', 'num_faces', 'best_likelihood'}
  by_name = {Path(row['file']).name: row for row in rows}
  assert by_name['5.png']['num_faces'] == '0' and float(by_name['5.png']['best_likelihood']) == 0
  assert sum(int(row['num_faces']) > 0 for row in rows) == r.num_detected
  assert set(r.failures()) >= {str(folder / '5.png'), str(folder / '6.png')}
  assert cli.main(['-q', 'afd', str(folder), '--csv', str(tmp_path / 'cli.csv')]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f'AFD: {r.rate:.4f} ({r.num_detected}/6')
  assert (tmp_path / 'cli.csv').is_file()


def test_float_arrays_and_errors(tmp_path, getchu500, detector):
  as_float = getchu500[:8].astype(np.float32) / 255.0
  a = afd.afd(as_float, detector=detector, progress=False)
  b = afd.afd(getchu500[:8], detector=detector, progress=False)
  assert a.rate == b.rate
  with pytest.raises(FileNotFoundError):
    afd.afd(tmp_path / 'missing', detector=detector)
  with pytest.raises(imageio.NoImagesError):
    afd.afd(tmp_path, detector=detector)


def test_yolo_needs_weights(tmp_path):
  with pytest.raises(FileNotFoundError, match='yolov8x6_animeface.pt'):
    afd.make_detector('yolo', weights=tmp_path / 'yolov8x6_animeface.pt')
  with pytest.raises(ValueError, match='Unknown detector'):
    afd.make_detector('nope')
