"""FID/KID: the Flax Inception and the maths against pytorch-fid and float64 numpy.

No download: pytorch-fid's network is built with random (Kaiming) weights and
copied into the Flax network; the released weights are never needed.
"""

import sys
from pathlib import Path

import _torch_compat as tc  # pylint: disable=g-bad-import-order  (stubs torchvision first)
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_fid import fid_score as pfid_score

from common import imageio
from metrics import __main__ as cli
from metrics import features, fid, inception, kid, weights

torch.set_num_threads(2)


@pytest.fixture(scope='module')
def torch_model():
  return tc.random_pytorch_fid_inception(seed=0, blocks=[0, 1, 2, 3])


@pytest.fixture(scope='module')
def params(torch_model):
  return inception.params_from_state_dict(tc.state_dict_numpy(torch_model))


@pytest.fixture(scope='module')
def extractor(params):
  return features.FeatureExtractor(params=params, batch_size=4)


@pytest.fixture(scope='module')
def images64():
  return np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def pool3_pair(torch_model, extractor, images64):
  """(ours, pytorch-fid's) pool3 features of the same 6 images (2 batches, padded)."""
  return extractor(images64), tc.torch_features(torch_model, images64)[3]


# --- Resize and architecture -----------------------------------------------


@pytest.mark.parametrize('shape', [(64, 64), (96, 96), (400, 400), (37, 300), (299, 299)])
def test_resize_matches_torch_bilinear(shape):
  x = np.random.default_rng(1).random((2,) + shape + (3,), dtype=np.float32)
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode='bilinear',
                      align_corners=False).permute(0, 2, 3, 1).numpy()
  ours_np = features.resize_bilinear(x)
  ours_jax = np.asarray(features.resize_bilinear(features.jnp.asarray(x)))
  assert ours_np.shape == ref.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(ours_np, ref, atol=1e-5)  # Float32 rounding only.
  np.testing.assert_allclose(ours_jax, ref, atol=1e-5)


def test_pool3_features_match_pytorch_fid(pool3_pair):
  ours, ref = pool3_pair
  assert ours.shape == ref.shape == (6, 2048)
  scale = np.abs(ref).max()
  assert scale > 1.0  # Non-trivial features, or the comparison means nothing.
  assert np.abs(ours - ref).max() < 1e-5 * scale


def test_all_blocks_match_pytorch_fid(torch_model, params):
  """64/192/768/2048-d features at 299 px (no resize), one forward pass."""
  x = np.random.default_rng(2).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
  refs = tc.torch_features(torch_model, x)
  net = inception.FIDInceptionV3((0, 1, 2, 3))
  ours = net.apply({'params': params}, features.jnp.asarray(x / 255.0 * 2 - 1, np.float32))
  for dim, o, r in zip((64, 192, 768, 2048), ours, refs):
    assert o.shape == r.shape == (2, dim)
    assert np.abs(np.asarray(o) - r).max() < 1e-5 * np.abs(r).max(), dim


def test_truncated_extractor_and_downsampling(torch_model, params):
  """dims=768 stops early; 400 px inputs are downsampled like torch (no antialias)."""
  x = np.random.default_rng(3).integers(0, 256, (2, 400, 400, 3), dtype=np.uint8)
  ext = features.FeatureExtractor(dims=768, params=params, batch_size=2)
  ref = tc.torch_features(torch_model, x)[2]
  ours = ext(x)
  assert ours.shape == (2, 768)
  assert np.abs(ours - ref).max() < 1e-5 * np.abs(ref).max()


def test_fid_matches_pytorch_fid_end_to_end(pool3_pair):
  # The first 128 pool3 dims: scipy's sqrtm of a 2048^2 matrix takes ~30 s here.
  ours, ref = pool3_pair[0][:, :128], pool3_pair[1][:, :128]
  with pytest.warns(fid.RankDeficientWarning):
    s1, s2 = fid.statistics_of_features(ours[:3]), fid.statistics_of_features(ours[3:])
  value = fid.frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
  expected = pfid_score.calculate_frechet_distance(
      ref[:3].mean(0), np.cov(ref[:3], rowvar=False),
      ref[3:].mean(0), np.cov(ref[3:], rowvar=False))
  assert value == pytest.approx(expected, rel=1e-4)


def test_folder_mixed_sizes_and_unreadable(tmp_path, torch_model, extractor):
  rng = np.random.default_rng(4)
  imgs = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in [(64, 64)] * 3 + [(80, 60)]]
  for i, im in enumerate(imgs):
    imageio.save_image(im, tmp_path / f'{i}.png')
  (tmp_path / 'broken.jpg').write_bytes(b'not an image')
  feats, paths = extractor.folder(tmp_path, progress=False)
  assert [p.name for p in paths] == ['0.png', '1.png', '2.png', '3.png']
  ref = np.concatenate([tc.torch_features(torch_model, im[None])[3] for im in imgs])
  assert np.abs(feats - ref).max() < 1e-5 * np.abs(ref).max()


def test_folder_errors(tmp_path, extractor):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    extractor.folder(tmp_path / 'missing')
  (tmp_path / 'notes.txt').write_text('no images here')
  with pytest.raises(imageio.NoImagesError):
    extractor.folder(tmp_path)
  (tmp_path / 'bad.png').write_bytes(b'garbage')
  with pytest.raises(imageio.NoImagesError, match='no readable image'):
    extractor.folder(tmp_path)


def test_clean_resize_is_pil_bicubic():
  yy, xx = np.mgrid[0:64, 0:64]
  img = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)  # Smooth: no overshoot.
  out = features.resize_clean(img)
  assert out.shape == (299, 299, 3) and out.dtype == np.float32
  assert out.min() >= 0 and out.max() <= 255
  pil = np.asarray(features.Image.fromarray(img).resize((299, 299), features.Image.BICUBIC))
  assert np.abs(out - pil).max() <= 1.0  # Same filter; PIL's uint8 path rounds and clips.
  const = np.full((50, 70, 3), 77, np.uint8)
  np.testing.assert_allclose(features.resize_clean(const), 77.0, atol=1e-3)


# --- Fréchet distance --------------------------------------------------------


def _random_stats(rng, d, n):
  x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
  return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize('d,n', [(32, 500), (64, 40)])  # Full rank, and singular covariances.
def test_frechet_distance_matches_pytorch_fid(d, n):
  rng = np.random.default_rng(d)
  (m1, s1), (m2, s2) = _random_stats(rng, d, n), _random_stats(rng, d, n)
  ours = fid.frechet_distance(m1, s1, m2, s2)
  ref = pfid_score.calculate_frechet_distance(m1, s1, m2, s2)
  assert ours == pytest.approx(ref, rel=1e-9, abs=1e-9)
  assert fid.frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))


def test_frechet_distance_closed_form_float64():
  """Diagonal covariances: d^2 = |dmu|^2 + sum (a + b - 2 sqrt(ab))."""
  rng = np.random.default_rng(7)
  m1, m2 = rng.normal(size=16), rng.normal(size=16)
  a, b = rng.uniform(0.1, 2, 16), rng.uniform(0.1, 2, 16)
  expected = np.sum((m1 - m2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
  assert fid.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_large_imaginary_part_is_an_error():
  with pytest.raises(ValueError, match='imaginary'):
    fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_too_few_images():
  with pytest.raises(ValueError, match='at least 2'):
    fid.statistics_of_features(np.ones((1, 8)))
  with pytest.warns(fid.RankDeficientWarning, match='rank-deficient'):
    fid.statistics_of_features(np.random.default_rng(0).normal(size=(10, 64)))


def test_statistics_file_is_pytorch_fid_format(tmp_path):
  feats = np.random.default_rng(8).normal(size=(100, 16))
  stats = fid.statistics_of_features(feats)
  path = stats.save(tmp_path / 'ref.npz')
  m, s = pfid_score.compute_statistics_of_path(str(path), None, 1, 16, 'cpu')
  np.testing.assert_array_equal(m, feats.mean(0))
  np.testing.assert_array_equal(s, np.cov(feats, rowvar=False))
  loaded = fid.load_statistics(path)
  assert loaded.num_images == 100 and loaded.sigma.dtype == np.float64
  assert fid.fid(path, stats, dims=16) == pytest.approx(0.0, abs=1e-8)


# --- KID ---------------------------------------------------------------------


def _mmd2_reference(x, y):
  """Unbiased MMD^2, cubic kernel, with explicit loops over the pairs' sums (float64)."""
  d, m = x.shape[1], x.shape[0]
  k = lambda a, b: (a @ b.T / d + 1.0) ** 3
  kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
  off = ~np.eye(m, dtype=bool)
  return kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean()


def test_kid_matches_float64_reference():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(200, 64))
  y = rng.normal(size=(200, 64)) * 1.1 + 0.2
  r = kid.kid_from_features(x, y, num_subsets=3, subset_size=1000)
  assert r.subset_size == 200  # min(1000, N): every subset is the whole set.
  assert r.mean == pytest.approx(_mmd2_reference(x, y), rel=1e-10)
  assert r.std == pytest.approx(0.0, abs=1e-10 * abs(r.mean))
  same = kid.kid_from_features(x[:100], x[100:], num_subsets=10, subset_size=50)
  assert abs(same.mean) < 0.25 * r.mean


def test_kid_subsets_like_clean_fid():
  """clean-fid's kernel_distance loop, re-stated, on the subsets we draw."""
  rng = np.random.default_rng(10)
  f1, f2 = rng.normal(size=(300, 32)), rng.normal(size=(250, 32)) + 0.1
  ours = kid.kid_from_features(f1, f2, num_subsets=5, subset_size=100, seed=3)
  draw = np.random.default_rng(3)
  t = 0.0
  for _ in range(5):
    y = f1[draw.choice(300, 100, replace=False)]
    x = f2[draw.choice(250, 100, replace=False)]
    a = (x @ x.T / 32 + 1) ** 3 + (y @ y.T / 32 + 1) ** 3
    b = (x @ y.T / 32 + 1) ** 3
    t += (a.sum() - np.diag(a).sum()) / 99 - b.sum() * 2 / 100
  assert ours.mean == pytest.approx(t / 5 / 100, rel=1e-10)


# --- Weights -----------------------------------------------------------------


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
  monkeypatch.delenv(weights.ENV_VAR, raising=False)
  monkeypatch.setenv(weights.CACHE_ENV_VAR, str(tmp_path / 'cache'))
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))

  def offline(*args, **kwargs):
    raise weights.urllib.error.URLError('network unreachable (test)')
  monkeypatch.setattr(weights.urllib.request, 'urlopen', offline)


def test_missing_weights_message(no_weights, tmp_path):
  for call in (lambda: weights.find_weights(), lambda: weights.find_weights(allow_download=False),
               lambda: weights.find_weights(tmp_path / 'nope.pth')):
    with pytest.raises(weights.WeightsNotFoundError) as e:
      call()
    msg = str(e.value)
    assert weights.FILENAME in msg and weights.URL in msg
    assert str(tmp_path / 'cache' / weights.FILENAME) in msg and weights.ENV_VAR in msg
  assert not (tmp_path / 'cache' / weights.FILENAME).exists()  # No partial download left.


def test_weights_pth_npz_roundtrip(no_weights, tmp_path, monkeypatch, torch_model, params):
  pth = tmp_path / weights.FILENAME
  torch.save(tc.raw_state_dict(torch_model), pth)  # Named like the release.
  monkeypatch.setenv(weights.ENV_VAR, str(pth))
  assert weights.find_weights() == pth
  npz = weights.convert(pth, tmp_path / 'inception.npz')
  st = weights.convert(pth, tmp_path / 'inception.safetensors')
  for src in (pth, npz, st):
    loaded = weights.load_params(src)
    flat = lambda p: {'/'.join(str(k.key) for k in path): v for path, v in
                      features.jax.tree_util.tree_flatten_with_path(p)[0]}
    a, b = flat(loaded), flat(params)
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Found in the cache folder without any variable.
  monkeypatch.delenv(weights.ENV_VAR)
  (tmp_path / 'cache').mkdir()
  npz.rename(tmp_path / 'cache' / weights.CONVERTED_FILENAME)
  assert weights.find_weights() == tmp_path / 'cache' / weights.CONVERTED_FILENAME


class _Evil:
  def __reduce__(self):
    return (print, ('pickled code ran',))


def test_weights_loading_refuses_pickled_code(tmp_path):
  path = tmp_path / 'evil.pth'
  torch.save({'x': _Evil()}, path)
  with pytest.raises(Exception, match='(?i)weights[ _]only|unsupported|not allowed'):
    weights.load_state_dict(path)


def test_download_checks_sha256(tmp_path, monkeypatch):
  src = tmp_path / 'fake.pth'
  src.write_bytes(b'not the weights')
  with pytest.raises(weights.WeightsNotFoundError, match='SHA-256'):
    weights.download(tmp_path / 'out.pth', url=src.as_uri())
  assert not (tmp_path / 'out.pth').exists()
  monkeypatch.setattr(weights, 'SHA256_PREFIX', weights.sha256_of(src)[:8])
  assert weights.download(tmp_path / 'out.pth', url=src.as_uri()).read_bytes() == b'not the weights'


# --- Command line ------------------------------------------------------------


def test_cli_stats_fid_kid(tmp_path, monkeypatch, capsys, torch_model):
  pth = tmp_path / 'w.pth'
  torch.save(tc.raw_state_dict(torch_model), pth)
  monkeypatch.setenv(weights.ENV_VAR, str(pth))
  rng = np.random.default_rng(11)
  real, fake = tmp_path / 'real', tmp_path / 'fake'
  imageio.write_numbered(rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8), real, ext='png')
  imageio.write_numbered(rng.integers(0, 128, (5, 64, 64, 3), dtype=np.uint8), fake, ext='png')
  opts = ['--batch-size', '4', '--dims', '64']
  stats = str(tmp_path / 'real.npz')
  assert cli.main(['-q', 'stats', str(real), stats, '--features'] + opts) == 0
  assert cli.main(['-q', 'fid', stats, str(fake)] + opts) == 0
  assert cli.main(['-q', 'fid', str(real), str(fake)] + opts) == 0
  assert cli.main(['-q', 'kid', stats, str(fake), '--subsets', '2'] + opts) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[1] == out[2] and out[1].startswith('FID: ')  # .npz == folder.
  assert float(out[1].split()[1]) > 0 and out[3].startswith('KID: ')
  ref = tc.torch_features(torch_model, imageio.load_images(real)[0])[0]
  loaded = fid.load_statistics(stats)
  np.testing.assert_allclose(loaded.mu, ref.mean(0), rtol=1e-4, atol=1e-5 * np.abs(ref).max())
  # Clear errors, exit code 2, no traceback.
  assert cli.main(['fid', str(tmp_path / 'missing'), str(fake)]) == 2
  assert 'does not exist' in capsys.readouterr().err
  monkeypatch.setenv(weights.ENV_VAR, str(tmp_path / 'gone.pth'))
  assert cli.main(['fid', str(real), str(fake), '--batch-size', '4']) == 2
  assert weights.URL in capsys.readouterr().err


def test_sharded_over_fake_devices():
  """Batches split over 4 (fake CPU) devices, with and without micro-batching."""
  import subprocess  # pylint: disable=g-import-not-at-top
  code = '\n'.join([
      'import os, sys',
      "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'",
      f'sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]',
      'import _torch_compat as tc',
      'import jax, numpy as np',
      'from metrics import features, inception',
      'model = tc.random_pytorch_fid_inception(0, dims=64)',
      'params = inception.params_from_state_dict(tc.state_dict_numpy(model))',
      'x = np.random.default_rng(0).integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)',
      'ref = tc.torch_features(model, x)[0]',
      'assert jax.device_count() == 4',
      'for mb in (1, 2, 4):',
      '  out = features.FeatureExtractor(64, params, batch_size=8, micro_batch=mb)(x)',
      '  print(np.abs(out - ref).max() / np.abs(ref).max())',
  ])
  run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  errors = [float(v) for v in run.stdout.split()]
  assert len(errors) == 3 and max(errors) < 1e-5, errors
