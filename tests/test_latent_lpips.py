"""LPIPS-VGG (latent/vae/lpips.py): parity with the `lpips` package, its weights file, and its use in stage 1."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import mesh as mesh_lib
from latent.vae import lpips as jlpips
from latent.vae import state as vae_state, train as vae_train
from latent.configs import vae_base
from test_latent_vae import tiny_config as tiny_vae_config


def tiny_config(weights='', weight=0.0):
  config = tiny_vae_config()
  config.loss.disc_start = 0  # GAN on from step 0: the adaptive weight sees the LPIPS gradient.
  config.loss.lpips_weight = weight
  config.loss.lpips_weights = str(weights)
  config.train.batch_size = 4
  config.train.num_steps = 1
  config.train.num_eval_images = 4
  return config


def random_weights_file(path, seed=0):
  """An .npz of the right keys and shapes with He-scaled random convs and non-negative heads."""
  rng = np.random.RandomState(seed)
  flat = {}
  for key, shape in jlpips.param_shapes().items():
    if key.endswith('bias'):
      flat[key] = rng.normal(0, 0.01, shape)
    elif key.startswith('lin'):
      flat[key] = np.abs(rng.normal(0, 0.1, shape))
    else:
      flat[key] = rng.normal(0, np.sqrt(2 / np.prod(shape[:3])), shape)
  np.savez(path, **{k: v.astype(np.float32) for k, v in flat.items()})
  return path


# --- Parity with the lpips package --------------------------------------------------------------

def test_matches_lpips_package_after_conversion(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import lpips as lpips_torch  # pylint: disable=g-import-not-at-top  (the test extra's)
  torch.manual_seed(0)
  # pnet_rand: torchvision's random VGG16 (no download); pretrained: the heads from the wheel.
  reference = lpips_torch.LPIPS(net='vgg', pretrained=True, pnet_rand=True, verbose=False).eval()
  # What the user has: torchvision's state dict (features.N.*) and lpips' vgg.pth (lin*).
  vgg = {'features.' + k.split('.', 1)[1]: v for k, v in reference.net.state_dict().items()}
  lin = {k: v for k, v in reference.state_dict().items() if re.match(r'lin\d\.', k)}
  assert len(vgg) == 26 and len(lin) == 5
  torch.save(vgg, tmp_path / 'vgg16.pth')
  torch.save(lin, tmp_path / 'vgg.pth')
  out = tmp_path / 'lpips_vgg.npz'
  jlpips.main(['convert', '--vgg', str(tmp_path / 'vgg16.pth'), '--lin', str(tmp_path / 'vgg.pth'),
               '--out', str(out)])
  # --lin left out: the installed wheel's vgg.pth, the heads LPIPS(pretrained=True) loaded.
  jlpips.main(['convert', '--vgg', str(tmp_path / 'vgg16.pth'), '--out', str(tmp_path / 'b.npz')])
  with np.load(out) as a, np.load(tmp_path / 'b.npz') as b:
    assert sorted(a.files) == sorted(b.files) == sorted(jlpips.param_shapes())
    assert all(np.array_equal(a[k], b[k]) for k in a.files)

  params = jlpips.load_params(out)
  distance = jax.jit(jlpips.lpips_distance)
  rng = np.random.RandomState(0)
  worst = 0.0
  for size in (32, 64):
    x = rng.uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
    # Unrelated images, a slightly perturbed copy, and a smooth (low-frequency) image pair.
    y = np.stack([rng.uniform(-1, 1, (size, size, 3)),
                  np.clip(x[1] + rng.normal(0, 0.05, (size, size, 3)), -1, 1),
                  np.tanh(np.cumsum(rng.normal(0, 0.2, (size, size, 3)), axis=0))]).astype(np.float32)
    with torch.no_grad():
      want = reference(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                       torch.from_numpy(y.transpose(0, 3, 1, 2))).numpy().reshape(-1)
    got = np.asarray(distance(params, x, y))
    assert got.shape == (3,) and np.all(want > 0)
    rel = np.abs(got - want) / np.abs(want)
    worst = max(worst, float(rel.max()))
    assert rel.max() < 1e-4, (size, got, want)
  print(f'LPIPS parity: max relative error {worst:.2e}')


def test_normalize_tensor_has_a_finite_gradient_at_zero_features():
  f = jnp.zeros((1, 2, 2, 8)).at[0, 0, 0].set(jnp.arange(8.0))
  grad = jax.grad(lambda f: jnp.sum(jlpips.normalize_tensor(f) * jnp.arange(8.0)))(f)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(jnp.linalg.norm(jlpips.normalize_tensor(f)[0, 0, 0]), 1.0, rtol=1e-6)


# --- The weights file -----------------------------------------------------------------------------

def test_missing_weights_file_fails_at_validation_naming_it_and_the_command(tmp_path):
  missing = tmp_path / 'lpips_vgg.npz'
  name = re.escape(str(missing))
  with pytest.raises(FileNotFoundError,
                     match=rf'loss\.lpips_weights=.*{name}.*python -m latent\.lpips convert'):
    vae_base.validate(tiny_config(missing, 1.0))
  with pytest.raises(ValueError, match=r'needs loss\.lpips_weights.*latent\.lpips convert'):
    vae_base.validate(tiny_config('', 1.0))
  with pytest.raises(FileNotFoundError, match=name):
    vae_train.train_and_evaluate(tiny_config(missing, 1.0), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()  # Nothing made, nothing computed.
  with pytest.raises(FileNotFoundError, match=rf'{name}.*latent\.lpips convert.*--out {name}'):
    jlpips.load_params(missing)
  vae_base.validate(tiny_config(missing, 0.0))  # Off: the file is never needed.


def test_malformed_weights_files_are_rejected_by_key(tmp_path):
  good = random_weights_file(tmp_path / 'good.npz')
  with np.load(good) as npz:
    flat = dict(npz)
  cases = {
      'missing': ({k: v for k, v in flat.items() if k != 'lin3.kernel'}, r"missing \['lin3.kernel'\]"),
      'shape': ({**flat, 'net.slice2.5.kernel': flat['net.slice2.5.kernel'][:, :, :8]},
                r'net.slice2.5.kernel has shape \(3, 3, 8, 128\), expected \(3, 3, 64, 128\)'),
      'negative': ({**flat, 'lin0.kernel': -flat['lin0.kernel']}, 'lin0.kernel has negative'),
      'extra': ({**flat, 'scaling_layer.shift': np.zeros(3)}, r"unexpected \['scaling_layer.shift'\]"),
  }
  for name, (arrays, message) in cases.items():
    np.savez(tmp_path / f'{name}.npz', **arrays)
    with pytest.raises(ValueError, match=message):
      jlpips.load_params(tmp_path / f'{name}.npz')
  # Validation reads the key list only: a missing array is caught before any compute too.
  with pytest.raises(ValueError, match=r"loss\.lpips_weights=.*lacks .*lin3\.kernel"):
    vae_base.validate(tiny_config(tmp_path / 'missing.npz', 1.0))
  (tmp_path / 'text.npz').write_text('not a zip')
  with pytest.raises(ValueError, match=r'is not an \.npz file'):
    vae_base.validate(tiny_config(tmp_path / 'text.npz', 1.0))


# --- In the stage-1 train step -------------------------------------------------------------------

def test_train_step_with_lpips_logs_it_and_adds_it_at_ldm_scale(tmp_path):
  config = tiny_config(random_weights_file(tmp_path / 'lpips.npz'), 0.5)
  vae_base.validate(config)
  lpips_params = vae_train.load_lpips(config)
  mesh = mesh_lib.make_mesh()
  model, disc = vae_state.build_model(config), vae_state.build_discriminator(config)
  tx, disc_tx = vae_state.make_optimizers(config)
  state = vae_state.create_train_state(config, model, disc, tx, disc_tx, mesh)
  params_before = jax.device_get(state.params)
  lpips_params = mesh_lib.place(lpips_params, mesh)
  step = vae_train.make_train_step(config, model, disc, tx, disc_tx, mesh, lpips_params)
  batch = mesh_lib.shard_batch(
      np.random.RandomState(0).randint(0, 256, (4, 16, 16, 3), dtype=np.uint8), mesh)
  step = step.lower(state, batch, lpips_params).compile()  # As loop.run does.
  new_state, metrics = step(state, batch, lpips_params)
  m = {k: float(v) for k, v in jax.device_get(metrics).items()}
  assert int(new_state.step) == 1
  assert np.isfinite(m['lpips']) and m['lpips'] > 0
  assert np.isfinite(m['grad_norm']) and m['gan_weight'] > 0
  # LDM adds the per-image LPIPS to every pixel before the sum over pixels.
  assert m['rec_loss'] == pytest.approx((m['l1'] + 0.5 * m['lpips']) * 16 * 16 * 3, rel=1e-4)
  # The LPIPS weights stay out of the optimised state.
  assert jax.tree.structure(new_state.params) == jax.tree.structure(params_before)
