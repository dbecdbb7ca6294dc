"""StyleGAN2 (stylegan/): maths against independent references, and a tiny real training run.

Everything is tiny (32x32, a few channels, mapping depth 2, batch 4) and each
model is compiled once per module, to stay within CI's 2-core budget.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from scipy import signal as scipy_signal

from stylegan import augment, loss, networks
from stylegan.configs import base as config_lib
from stylegan.configs import anime64, demo

TINY_MODEL = dict(resolution=32, z_dim=32, w_dim=32, mapping_layers=2,
                  channel_base=256, channel_max=32)


# ---------------------------------------------------------------------------
# Networks.


def _np_modconv(x, w, s, demodulate):
  """Float64 reference: per-sample weights w'' from the paper's formula, SAME conv."""
  x, w, s = (np.asarray(a, np.float64) for a in (x, w, s))
  n, h, wd, _ = x.shape
  k = w.shape[0]
  p = k // 2
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out = np.zeros((n, h, wd, w.shape[3]))
  for b in range(n):
    wb = w * s[b][None, None, :, None]                 # w'_ijk = s_i w_ijk
    if demodulate:
      wb = wb / np.sqrt(np.sum(wb ** 2, axis=(0, 1, 2), keepdims=True) + 1e-8)
    for dy in range(k):
      for dx in range(k):
        out[b] += np.einsum('hwi,io->hwo', xp[b, dy:dy + h, dx:dx + wd], wb[dy, dx])
  return out


@pytest.mark.parametrize('demodulate', [True, False])
def test_modulated_conv_matches_float64_reference(demodulate):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)
  w = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
  s = (rng.standard_normal((2, 4)) + 1.0).astype(np.float32)
  got = np.asarray(networks.modulated_conv2d(x, w, s, demodulate=demodulate))
  want = _np_modconv(x, w, s, demodulate)
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err < 1e-5, err


def test_demodulated_output_has_unit_variance():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((8, 16, 16, 64)).astype(np.float32)
  w = rng.standard_normal((3, 3, 64, 32)).astype(np.float32)
  s = rng.uniform(0.2, 3.0, (8, 64)).astype(np.float32)  # Very unequal styles.
  y = np.asarray(networks.modulated_conv2d(x, w, s))[:, 1:-1, 1:-1]  # Skip zero-padded borders.
  assert abs(y.var() - 1.0) < 0.05, y.var()
  # Without demodulation the scale follows the styles: far from 1.
  y_mod = np.asarray(networks.modulated_conv2d(x, w, s, demodulate=False))[:, 1:-1, 1:-1]
  assert y_mod.var() > 10


def _np_upfirdn2d(x, f1, up, down, pad, gain):
  """Float64 reference with the full 2-D filter (scipy convolve2d), per image/channel."""
  f = np.outer(f1, f1) / np.sum(f1) ** 2 * gain
  n, h, w, c = x.shape
  z = np.zeros((n, h * up, w * up, c))
  z[:, ::up, ::up] = x
  z = np.pad(z, ((0, 0), pad, pad, (0, 0)))
  out = np.stack([np.stack([scipy_signal.convolve2d(z[b, :, :, ch], f, mode='valid')
                            for ch in range(c)], -1) for b in range(n)])
  return out[:, ::down, ::down]


def test_filtered_resampling_matches_2d_reference():
  x = np.random.default_rng(2).standard_normal((2, 8, 8, 3))
  f = networks.setup_filter()
  got_up = np.asarray(networks.upsample2d(jnp.asarray(x, jnp.float32), f))
  np.testing.assert_allclose(got_up, _np_upfirdn2d(x, [1, 3, 3, 1], 2, 1, (2, 1), 4.0), atol=1e-5)
  got_down = np.asarray(networks.downsample2d(jnp.asarray(x, jnp.float32), f))
  want_down = _np_upfirdn2d(x, [1, 3, 3, 1], 1, 2, (1, 1), 1.0)
  np.testing.assert_allclose(got_down, want_down, atol=1e-5)
  assert got_up.shape == (2, 16, 16, 3) and got_down.shape == (2, 4, 4, 3)


def test_minibatch_std_appends_group_stddev():
  x = np.random.default_rng(3).standard_normal((8, 4, 4, 6)).astype(np.float32)
  y = np.asarray(networks.minibatch_std(jnp.asarray(x), group_size=4))
  assert y.shape == (8, 4, 4, 7)
  for g in range(2):  # Consecutive groups of 4.
    grp = x[4 * g:4 * g + 4]
    want = np.sqrt(grp.var(axis=0) + 1e-8).mean()
    np.testing.assert_allclose(y[4 * g:4 * g + 4, ..., 6], want, rtol=1e-5)


@pytest.fixture(scope='module')
def tiny_g():
  """(generator, params, jitted mapping, jitted G(z, w_avg, psi) with const noise)."""
  g = networks.Generator(**TINY_MODEL)
  key = jax.random.key(0, impl='rbg')  # Compiles faster than threefry on CPU.
  params = jax.jit(lambda k: g.init({'params': k, 'noise': k}, jnp.zeros((1, 32))))(key)['params']
  mapping = jax.jit(lambda z: g.apply({'params': params}, z, method='mapping'))
  generate = jax.jit(
      lambda z, w_avg, psi: g.apply({'params': params}, z, w_avg, psi, None, 'const'))
  return g, params, mapping, generate


def test_generator_shapes_and_num_ws(tiny_g):
  _, params, mapping, generate = tiny_g
  z = jax.random.normal(jax.random.PRNGKey(1), (4, 32))
  ws = mapping(z)
  assert ws.shape == (4, networks.num_ws_for(32), 32) == (4, 8, 32)
  img = generate(z, jnp.zeros(32), 1.0)
  assert img.shape == (4, 32, 32, 3) and np.all(np.isfinite(img))
  # Mapping weights are stored at 1/lr_mul = 100x scale (equalised learning rate).
  assert 50 < np.std(params['mapping_net']['fc0']['weight']) < 200


def test_truncation_psi_zero_gives_one_image(tiny_g):
  generate = tiny_g[3]
  z = jax.random.normal(jax.random.PRNGKey(3), (4, 32))
  w_avg = jax.random.normal(jax.random.PRNGKey(4), (32,))
  img = np.asarray(generate(z, w_avg, 0.0))
  np.testing.assert_allclose(img, np.broadcast_to(img[:1], img.shape), atol=1e-5)
  img1 = np.asarray(generate(z, w_avg, 1.0))
  assert np.abs(img1 - img1[:1]).max() > 1e-2  # psi=1: different z, different images.
  # A cutoff truncates only the first layers.
  ws = jax.random.normal(jax.random.PRNGKey(5), (4, 8, 32))
  t = np.asarray(networks.truncate(ws, w_avg, 0.0, cutoff=3))
  np.testing.assert_allclose(t[:, :3], np.broadcast_to(w_avg, (4, 3, 32)))
  np.testing.assert_allclose(t[:, 3:], ws[:, 3:])


def test_w_avg_moves_toward_batch_mean(tiny_g):
  mapping = tiny_g[2]
  ws = mapping(jax.random.normal(jax.random.PRNGKey(6), (16, 32)))
  mean = np.asarray(ws[:, 0]).mean(0)
  w_avg = np.zeros(32, np.float32)
  new = np.asarray(networks.update_w_avg(jnp.asarray(w_avg), ws, beta=0.995))
  np.testing.assert_allclose(new, w_avg + 0.005 * (mean - w_avg), rtol=1e-4, atol=1e-6)
  assert np.linalg.norm(new - mean) < np.linalg.norm(w_avg - mean)


def _np_lrelu(x):
  return np.where(x >= 0, x, 0.2 * x) * np.sqrt(2.0)


def _np_dense(x, p, lr_mul=1.0, act=False):
  """FullyConnectedLayer: w * lr_mul / sqrt(fan_in), b * lr_mul."""
  w, b = np.asarray(p['weight'], np.float64), np.asarray(p['bias'], np.float64)
  y = x @ (w * lr_mul / np.sqrt(w.shape[0])) + b * lr_mul
  return _np_lrelu(y) if act else y


def _np_generator(params, z, mapping_layers):
  """Float64 transcription of stylegan2-ada-pytorch's mapping + skip synthesis (no noise).

  Written from the paper/reference formulas, independently of networks.py: the
  modulated conv builds per-sample weights (_np_modconv), upsampling is zero
  insertion + the [1,3,3,1] filter with gain 4 (_np_upfirdn2d), and the skip
  generator sums upsampled ToRGB outputs.
  """
  m, syn = params['mapping_net'], params['synthesis_net']
  x = np.asarray(z, np.float64)
  x = x / np.sqrt(np.mean(x ** 2, axis=1, keepdims=True) + 1e-8)
  for i in range(mapping_layers):
    x = _np_dense(x, m[f'fc{i}'], lr_mul=0.01, act=True)
  w = x  # Every layer gets the same w (no mixing, no truncation).
  up = lambda t: _np_upfirdn2d(t, [1, 3, 3, 1], 2, 1, (2, 1), 4.0)

  def layer(p, h, upsample):
    s = _np_dense(w, p['affine'])
    h = up(h) if upsample else h
    h = _np_modconv(h, np.asarray(p['weight']), s, demodulate=True)
    return _np_lrelu(h + np.asarray(p['bias'], np.float64))

  def torgb(p, h):
    s = _np_dense(w, p['affine']) / np.sqrt(h.shape[-1])
    return _np_modconv(h, np.asarray(p['weight']), s, demodulate=False) + np.asarray(p['bias'])

  res, img = 4, None
  while f'b{res}' in syn:
    b = syn[f'b{res}']
    if res == 4:
      h = np.broadcast_to(np.asarray(b['const'], np.float64), (len(z),) + b['const'].shape)
    else:
      h = layer(b['conv0'], h, upsample=True)
    h = layer(b['conv1'], h, upsample=False)
    y = torgb(b['torgb'], h)
    img = y if img is None else up(img) + y
    res *= 2
  return img


def test_generator_matches_float64_reference(tiny_g):
  """Mapping + synthesis against an independent float64 transcription, same weights."""
  g, params, _, _ = tiny_g
  rng = np.random.default_rng(7)
  # Non-zero biases everywhere (init has zeros), so every term is exercised.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)
      if path[-1].key == 'bias' else x, params)
  z = rng.standard_normal((3, 32)).astype(np.float32)
  got = np.asarray(g.apply({'params': params}, z, noise_mode='none'))
  want = _np_generator(params, z, TINY_MODEL['mapping_layers'])
  assert got.shape == want.shape == (3, 32, 32, 3)
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err < 1e-4, err
  # And the images depend on z: the per-pixel std across samples is far from zero.
  assert want.std(axis=0).mean() > 0.05 * np.abs(want).mean()


def test_resolution_must_be_power_of_two():
  with pytest.raises(ValueError, match='power of two'):
    networks.check_resolution(48)
  with pytest.raises(ValueError, match='from 32 to 256'):
    networks.check_resolution(512)


# ---------------------------------------------------------------------------
# Losses.


def test_r1_matches_finite_differences():
  """R1 = ||grad_x D(x)||^2, against central differences on every pixel (float64)."""
  with jax.enable_x64(True):
    # One grey channel and few features keep the 2 x 1024 evaluations cheap.
    d = networks.Discriminator(resolution=32, channel_base=32, channel_max=4)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 32, 1), jnp.float64)
    params = jax.jit(d.init)(jax.random.PRNGKey(1), x.astype(jnp.float32))  # Eager is slow.
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    d_fn = lambda img: d.apply(params, img)
    r1, logits = jax.jit(lambda img: loss.r1_penalty(d_fn, img))(x)
    eps = 1e-5
    basis = jnp.eye(x.size, dtype=jnp.float64).reshape((x.size,) + x.shape[1:])
    d_one = jax.jit(jax.vmap(lambda e: d_fn(x + eps * e[None])[0]))
    grad_fd = (d_one(basis) - d_one(-basis)) / (2 * eps)
    want = float(jnp.sum(grad_fd ** 2))
    assert logits.shape == (1,)
    assert abs(float(r1[0]) - want) / want < 1e-6, (float(r1[0]), want)


def test_path_lengths_of_a_linear_synthesis():
  """For img = ws . A, J^T y is explicit: compare with the library's estimate."""
  a = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 5 * 5 * 3))
  synth = lambda ws: jnp.einsum('nlw,lwp->np', ws, a).reshape(-1, 5, 5, 3)
  ws = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 6))
  key = jax.random.PRNGKey(2)
  got = loss.path_lengths(synth, ws, key)
  y = jax.random.normal(key, (3, 5, 5, 3)) / 5.0
  grads = jnp.einsum('np,lwp->nlw', y.reshape(3, -1), a)
  want = jnp.sqrt(jnp.mean(jnp.sum(grads ** 2, axis=2), axis=1))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  penalty, new_mean = loss.path_length_penalty(got, jnp.float32(1.0), decay=0.01)
  np.testing.assert_allclose(new_mean, 1.0 + 0.01 * (got.mean() - 1.0), rtol=1e-6)
  np.testing.assert_allclose(penalty, np.mean((got - new_mean) ** 2), rtol=1e-5)


def test_logistic_losses_and_style_mixing():
  logits = jnp.array([-2.0, 0.0, 3.0])
  np.testing.assert_allclose(loss.g_nonsaturating_loss(logits),
                             np.mean(np.log1p(np.exp(-logits))), rtol=1e-6)
  fake, real = loss.d_logistic_loss(logits, -logits)
  np.testing.assert_allclose(fake, real, rtol=1e-6)
  ws, ws2 = jnp.zeros((2, 8, 4)), jnp.ones((2, 8, 4))
  assert np.all(loss.style_mix(jax.random.PRNGKey(0), ws, ws2, 0.0) == 0)
  mixed = np.asarray(loss.style_mix(jax.random.PRNGKey(0), ws, ws2, 1.0))
  cut = int(np.argmax(mixed[0, :, 0]))  # First layer from ws2.
  assert 1 <= cut < 8 and np.all(mixed[:, :cut] == 0) and np.all(mixed[:, cut:] == 1)


# ---------------------------------------------------------------------------
# Augmentation.


def test_augment_policy_probability_and_gradients():
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 3), minval=-1, maxval=1)
  key = jax.random.PRNGKey(1)
  policy = augment.parse_policy('color, translation,cutout')
  assert policy == augment.AUGMENTATIONS
  run = jax.jit(lambda v, p: augment.augment(key, v, policy, p))  # One compile for all p.
  np.testing.assert_array_equal(run(x, 0.0), x)
  y = run(x, 1.0)
  assert y.shape == x.shape and float(jnp.abs(y - x).max()) > 0.1
  g = jax.jit(jax.grad(lambda v: jnp.sum(run(v, 1.0) ** 2)))(x)
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0
  # Cutout zeroes a quarter of the image (a half-size square) unless it hits a border.
  c = np.asarray(jax.jit(augment.cutout)(key, jnp.ones((4, 16, 16, 1))))
  zeros = (c == 0).sum(axis=(1, 2, 3))
  assert np.all(zeros <= 64) and np.all(zeros >= 16)
  assert augment.parse_policy('') == ()


def test_unknown_augmentation_is_an_error():
  with pytest.raises(ValueError, match="Unknown augmentation 'rotate'"):
    augment.parse_policy('color,rotate')
  c = demo.get_config()
  c.augment.policy = 'color,rotate'
  with pytest.raises(ValueError, match=r'augment\.policy'):
    config_lib.validate(c)


def test_ada_adjust_moves_p_with_overfitting():
  p = jnp.float32(0.5)
  up = augment.ada_adjust(p, jnp.float32(0.9), 0.6, batch_size=64, interval=4, ada_kimg=500)
  down = augment.ada_adjust(p, jnp.float32(0.1), 0.6, batch_size=64, interval=4, ada_kimg=500)
  np.testing.assert_allclose([up, down], [0.5 + 256 / 5e5, 0.5 - 256 / 5e5], rtol=1e-6)
  assert float(augment.ada_adjust(jnp.float32(0.0), jnp.float32(0.0), 0.6, 64, 4, 500)) == 0.0


# ---------------------------------------------------------------------------
# Configs.


def test_shipped_configs_validate():
  config_lib.validate(demo.get_config())
  config_lib.validate(anime64.get_config())


@pytest.mark.parametrize('key,value,error,match', [
    ('model.resolution', 48, ValueError, r'model\.resolution must be a power of two'),
    ('data.image_size', 64, ValueError, r'data\.image_size=64 differs'),
    ('augment.policy', 'colour', ValueError, r'augment\.policy'),
    ('loss.r1_gamma', -1.0, ValueError, r'loss\.r1_gamma'),
    ('sample.noise_mode', 'fixed', ValueError, r'sample\.noise_mode'),
])
def test_bad_config_values_name_the_key(key, value, error, match):
  c = demo.get_config()
  section, name = key.split('.')
  c[section][name] = value
  with pytest.raises(error, match=match):
    config_lib.validate(c)


def test_unknown_config_key_is_an_error():
  c = demo.get_config()
  c.loss.unlock()
  c.loss.r1_gama = 1.0
  with pytest.raises(KeyError, match=r'config\.loss\.r1_gama'):
    config_lib.validate(c)


def test_folder_images_of_another_size_are_an_error(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from common import data as data_lib  # pylint: disable=g-import-not-at-top
  for i in range(2):
    Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(tmp_path / f'{i}.png')
  c = demo.get_config()
  c.data.source = 'folder'
  c.data.path = str(tmp_path)
  c.data.resize = False  # 64x64 files, config says 32.
  with pytest.raises(ValueError, match='image_size=32'):
    data_lib.load_dataset(c.data)


# ---------------------------------------------------------------------------
# Training on the built-in digits (no download, so these run on a fresh clone): a few
# dozen steps, the EMA, donation, checkpoints, resume, SIGTERM, sampling.


def _train_config(num_steps):
  c = demo.get_config()  # data.source='digits' at 32x32.
  c.data.max_images = 256
  for k, v in TINY_MODEL.items():
    c.model[k] = v
  c.model.mbstd_group_size = 4
  c.loss.pl_weight = 2.0  # The regularisers the demo turns off are exercised here.
  c.loss.style_mixing_prob = 0.9
  c.augment.policy = 'color,translation,cutout'
  c.augment.ada_kimg = 1  # p moves visibly within the run.
  c.train.batch_size = 4
  c.train.num_steps = num_steps
  c.train.log_every = 8
  c.train.checkpoint_every = 12
  c.train.sample_every = 1000
  c.train.num_grid_samples = 4
  c.sample.batch_size = 4
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  from stylegan import state as state_lib, train  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('stylegan')
  config = _train_config(24)
  init = jax.device_get(state_lib.init_state(config))  # Host copies: nothing can donate them.
  straight = train.train_and_evaluate(config, root / 'straight')
  # The same run cut in two: stop at 12, then a fresh call resumes from the checkpoint.
  train.train_and_evaluate(_train_config(12), root / 'resumed')
  resumed = train.train_and_evaluate(config, root / 'resumed')
  return dict(config=config, root=root, init=init, straight=straight, resumed=resumed)


def _images(state, config):
  from stylegan import generate  # pylint: disable=g-import-not-at-top
  z = generate.fixed_latents(config, 4)
  return generate.generate(state.g_params, state.w_avg, config, z), \
      generate.generate(state.g_ema_params, state.w_avg, config, z)


def _one_more_step(trained):
  """(host copy of the final state, the compiled phases, the state after step 24 run on a
  device copy of it, that copy's leaves, the step's metrics). The phases are the run's own
  (`get_steps` caches them per config and mesh): nothing is compiled again."""
  from common import data as data_lib, mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from stylegan import phases  # pylint: disable=g-import-not-at-top
  config, final = trained['config'], trained['straight']
  mesh = mesh_lib.make_mesh(config.get('mesh'))
  images = data_lib.load_dataset(config.data)
  reals = mesh_lib.shard_batch(
      next(data_lib.BatchIterator(images, config.train.batch_size, config.seed, step=24)), mesh)
  steps = phases.get_steps(config, mesh)
  assert steps.compiled  # The run compiled them.
  fn = steps.compile(final, reals)
  copy = jax.tree.map(lambda x: x.copy(), final)  # The fixture's state stays usable.
  leaves = jax.tree.leaves(copy)
  after, metrics = fn(copy, reals, 24)
  return jax.device_get(final), steps, jax.device_get(after), leaves, metrics


def test_training_runs_and_trains_every_parameter(trained):
  init, final = trained['init'], trained['straight']
  assert int(final.step) == 24
  for leaf in jax.tree.leaves((final.g_params, final.d_params, final.pl_mean, final.w_avg)):
    assert np.all(np.isfinite(np.asarray(leaf)))
  # Every parameter of G and D received updates (none is cut off from its loss).
  for net in ('g_params', 'd_params'):
    paths = jax.tree_util.tree_flatten_with_path(getattr(init, net))[0]
    for (path, a), b in zip(paths, jax.tree.leaves(getattr(final, net))):
      assert not np.array_equal(a, np.asarray(b)), (net, jax.tree_util.keystr(path))
  assert float(final.pl_mean) > 0                    # Path-length reg ran.
  assert float(final.ada_p) > 0                      # ADA moved p.
  assert float(jnp.linalg.norm(final.w_avg)) > 0     # w_avg is tracked.
  assert (trained['root'] / 'straight' / 'samples_during_training' / '00000024.png').exists()


def test_g_ema_is_the_ema_of_g_with_the_ramped_half_life(trained):
  """One more step (step 24): G_ema <- beta G_ema + (1 - beta) G, with G after this step's
  G phases and beta = 0.5 ** (batch / min(ema_kimg * 1000, step * batch * ema_rampup))."""
  before, _, after, _, _ = _one_more_step(trained)
  t = trained['config'].train
  beta = 0.5 ** (t.batch_size / min(t.ema_kimg * 1000, 24 * t.batch_size * t.ema_rampup))
  assert 0.5 < beta < 0.6  # The ramp sets it here (0.561): far from both 0 and 1.
  assert int(after.step) == 25
  g_leaves = jax.tree_util.tree_flatten_with_path(after.g_params)[0]
  for (path, g), old_ema, old_g, ema in zip(g_leaves, jax.tree.leaves(before.g_ema_params),
                                            jax.tree.leaves(before.g_params),
                                            jax.tree.leaves(after.g_ema_params)):
    name = jax.tree_util.keystr(path)
    g, old_ema, ema = (np.asarray(a, np.float64) for a in (g, old_ema, ema))
    assert not np.array_equal(g, old_g), name  # The step trained G...
    want = beta * old_ema + (1 - beta) * g     # ...and G_ema followed it.
    scale = max(np.abs(g).max(), np.abs(old_ema).max(), 1e-30)
    np.testing.assert_allclose(ema, want, rtol=0, atol=1e-6 * scale, err_msg=name)
  # Not satisfied by a G_ema that is G, or that stayed put: the lag is far above float error.
  lag = max(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30)
            for a, b in zip(jax.tree.leaves(before.g_ema_params), jax.tree.leaves(after.g_params)))
  assert lag > 1e-3, lag


def test_phases_donate_the_state(trained):
  """Each compiled phase writes the new state into the old one's buffers (the state is held
  once, not twice), and the state passed to a step is consumed."""
  _, steps, _, leaves, metrics = _one_more_step(trained)
  state_bytes = sum(x.nbytes for x in leaves)
  for name in ('g_main', 'g_reg', 'd_main', 'd_reg', 'finish'):
    compiled = getattr(steps, name)
    assert 'input_output_alias' in compiled.as_text(), name
    analysis = compiled.memory_analysis()
    if analysis is not None:  # Every aliased byte is the state's: all of it.
      assert analysis.alias_size_in_bytes == state_bytes, (name, analysis.alias_size_in_bytes)
  assert all(x.is_deleted() for x in leaves)
  assert all(np.isfinite(float(v)) for v in metrics.values())  # Metrics are not donated.


def test_resume_reproduces_the_uninterrupted_run(trained):
  a, b = trained['straight'], trained['resumed']
  assert int(b.step) == 24
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ga, ea = _images(a, trained['config'])
  gb, eb = _images(b, trained['config'])
  np.testing.assert_array_equal(ea, eb)
  np.testing.assert_array_equal(ga, gb)


def test_checkpoint_round_trip_and_sampling(trained, tmp_path):
  from common import experiment  # pylint: disable=g-import-not-at-top
  from stylegan import sample, train  # pylint: disable=g-import-not-at-top
  config, workdir = trained['config'], trained['root'] / 'straight'
  restored = experiment.restore_for_sampling(train.Experiment(config), workdir, '')
  for x, y in zip(jax.tree.leaves(trained['straight']), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  config = config.copy_and_resolve_references()
  config.sample.num_images, config.sample.psi = 5, 0.7
  config.sample.output_dir = str(tmp_path / 'out')
  out = sample.generate(config, workdir)
  assert sorted(p.name for p in out.iterdir()) == sorted(f'{i}.jpg' for i in range(1, 6))
  assert (tmp_path / 'out_grid.png').exists()
  # psi=0 collapses every sample onto w_avg: one image.
  imgs = sample.sample_images(config, workdir, 3, psi=0.0)
  assert np.abs(imgs.astype(int) - imgs[:1]).max() <= 1


def test_sigterm_saves_a_checkpoint_and_resume_continues(trained, tmp_path, monkeypatch):
  """SIGTERM mid-run: a checkpoint at that step, a clean return, then an exact resume."""
  from common import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from stylegan import train  # pylint: disable=g-import-not-at-top
  should_stop = checkpoint_lib.PreemptionGuard.should_stop

  def sigterm_at_5(self, step):
    if step == 5:
      signal.raise_signal(signal.SIGTERM)  # Handled by the guard, not fatal.
    return should_stop(self, step)

  monkeypatch.setattr(checkpoint_lib.PreemptionGuard, 'should_stop', sigterm_at_5)
  config, workdir = trained['config'], tmp_path / 'run'
  stopped = train.train_and_evaluate(config, workdir)
  assert int(stopped.step) == 5
  assert checkpoint_lib.Checkpointer(workdir, 1).latest_step() == 5
  monkeypatch.setattr(checkpoint_lib.PreemptionGuard, 'should_stop', should_stop)
  final = train.train_and_evaluate(config, workdir)
  for x, y in zip(jax.tree.leaves(trained['straight']), jax.tree.leaves(final)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------
# The demo end to end (slow tier): what a user sees must be varied digits.


@pytest.mark.slow
def test_demo_generator_is_varied_and_d_recovers(tmp_path):
  """The digits demo as shipped: G_ema's samples vary like the data, D's margin closes.

  This is what the old demo failed (every z gave one blurry shape): its samples'
  diversity was about 0.4 of the data's at the end of the run.
  """
  from common import data as data_lib  # pylint: disable=g-import-not-at-top
  from common.logs import read_scalars  # pylint: disable=g-import-not-at-top
  from stylegan import sample, train  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  workdir = tmp_path / 'demo'
  train.train_and_evaluate(config, workdir)

  diversity = read_scalars(workdir, 'diversity/G_ema')
  assert diversity[-1][0] == config.train.num_steps
  assert diversity[-1][1] > 0.6, diversity  # Measured 0.92; the collapsed demo gave 0.40.
  # Per-pixel std across samples against the real digits' (not near zero).
  config.sample.num_images = 64
  config.sample.output_dir = str(tmp_path / 'samples')
  fakes = sample.sample_images(config, workdir, 64).astype(np.float32)
  reals = data_lib.load_dataset(config.data)[:512].astype(np.float32)
  assert fakes.std(axis=0).mean() > 0.6 * reals.std(axis=0).mean()
  # D separates reals from fakes early, then the margin closes as G improves.
  real = dict(read_scalars(workdir, 'D/real_logits'))
  fake = dict(read_scalars(workdir, 'D/fake_logits'))
  gaps = [real[s] - fake[s] for s in sorted(real)]
  assert max(gaps) > 2.0 and gaps[-1] < 0.5 * max(gaps), gaps
  # --mode=sample's layout: OUT/1.jpg ... N.jpg and OUT_grid.png beside it.
  out = sample.generate(config, workdir)
  assert sorted(int(p.stem) for p in out.iterdir()) == list(range(1, 65))
  assert (tmp_path / 'samples_grid.png').is_file()


@pytest.mark.slow
def test_two_modes_both_appear(tmp_path):
  """On the digits 0 and 1 only (a two-mode set), G_ema makes both after a short run.

  A collapsed generator puts (nearly) every sample on one mode. Measured: 33% ones
  after 1,500 steps (the data: 50%). Each sample is assigned to the nearer class mean.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from common import data as data_lib  # pylint: disable=g-import-not-at-top
  from stylegan import generate, train  # pylint: disable=g-import-not-at-top
  labels = load_digits().target
  config = demo.get_config()
  images = data_lib.load_dataset(config.data)
  folder = tmp_path / 'zeros_and_ones'
  folder.mkdir()
  keep = np.flatnonzero(labels < 2)
  for i in keep:
    Image.fromarray(images[i]).save(folder / f'{i}.png')
  config.data.source, config.data.path = 'folder', str(folder)
  config.train.num_steps = 1500
  state = train.train_and_evaluate(config, tmp_path / 'run')

  z = np.random.default_rng(1).standard_normal((256, config.model.z_dim)).astype(np.float32)
  fakes = generate.generate(state.g_ema_params, state.w_avg, config, z).astype(np.float32)
  reals = images[keep].astype(np.float32)
  means = [reals[labels[keep] == k].mean(0) for k in (0, 1)]

  def share_of_ones(x):
    d = [np.linalg.norm((x - m).reshape(len(x), -1), axis=1) for m in means]
    return float(np.mean(d[1] < d[0]))

  assert abs(share_of_ones(reals) - 0.5) < 0.02  # The assignment itself works on the data.
  assert 0.2 < share_of_ones(fakes) < 0.8, share_of_ones(fakes)
