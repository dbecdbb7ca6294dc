"""Training end to end on a tiny U-Net: loss, sampling, checkpoints, resume, devices, errors."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from common import checkpoint, data, imageio
from common.logs import read_scalars
from ddpm import samplers, sample, train
from ddpm.configs import default
from conftest import shared_path

REPO = Path(__file__).resolve().parents[1]


def tiny_config(data_path=None):
  config = default.get_config()
  if data_path is None:
    config.data.source = 'digits'
  else:
    config.data.path = str(data_path)
    config.data.max_images = 512
  config.data.image_size = 16
  config.model.block_out_channels = (16, 32)
  config.model.layers_per_block = 1
  config.model.attention_resolutions = (8,)
  config.model.norm_groups = 8
  config.diffusion.num_timesteps = 100
  config.diffusion.schedule = 'cosine'
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 10
  config.train.batch_size = 16
  config.train.num_steps = 20
  config.train.log_every = 5
  config.train.checkpoint_every = 5
  config.train.sample_every = 0
  config.train.ema_decay = 0.9
  config.train.async_checkpoint = False
  config.sample.num_steps = 10
  config.sample.num_images = 6
  config.sample.batch_size = 4
  config.sample.progressive = True
  return config


def write_tiny_config_file(folder, *overrides: str, name: str = 'tiny') -> Path:
  """A config file for `python -m ddpm.main`: tiny_config() plus `c.KEY = VALUE` lines."""
  path = folder / f'{name}.py'
  body = ''.join(f'  {line}\n' for line in overrides)
  path.write_text(f'import sys\nsys.path.insert(0, {str(REPO / "tests")!r})\n'
                  'from test_ddpm_train import tiny_config\n'
                  f'def get_config():\n  c = tiny_config()\n{body}  return c\n')
  return path


def params_of(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def tree_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A few hundred steps on real anime faces (or digits when ../shared is absent)."""
  try:
    path = shared_path('data', 'anime_faces_getchu64', 'images')
  except pytest.skip.Exception:
    path = None
  config = tiny_config(path)
  config.train.num_steps = 300
  config.train.log_every = 25
  config.train.checkpoint_every = 100
  config.train.sample_every = 300
  config.train.num_grid_samples = 4
  workdir = tmp_path_factory.mktemp('trained')
  state = train.train_and_evaluate(config, str(workdir))
  return config, workdir, state


def test_loss_falls(trained):
  _, workdir, state = trained
  assert int(state.step) == 300
  losses = [v for _, v in read_scalars(workdir, 'loss')]
  assert len(losses) == 12
  assert np.mean(losses[-3:]) < 0.6 * losses[0], losses
  assert all(np.isfinite(losses))
  # Progress scalars and an EMA sample grid reach TensorBoard.
  assert read_scalars(workdir, 'steps_per_sec')
  assert (workdir / 'samples_during_training' / '00000300.png').exists()


def test_sampling_writes_numbered_images(trained, tmp_path):
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.sample.output_dir = str(tmp_path / 'out')
  out = sample.generate(config, workdir)
  files = sorted(p.name for p in out.iterdir())
  assert files == sorted(f'{i}.jpg' for i in range(1, 7))
  for i in range(1, 7):
    with Image.open(out / f'{i}.jpg') as im:
      assert im.size == (16, 16) and im.mode == 'RGB'
  assert (tmp_path / 'out_grid.png').exists() and (tmp_path / 'out_progressive.png').exists()


def _roughness(images: np.ndarray) -> float:
  """Mean absolute difference of horizontally neighbouring pixels (uint8 levels)."""
  return float(np.abs(np.diff(images.astype(np.float32), axis=2)).mean())


def test_ddpm_sampler_runs_all_steps(trained, tmp_path, monkeypatch):
  """sample.sampler='ddpm' evaluates the model at every one of the T timesteps, T-1 down to
  0, and writes images that are the trained model's: distinct per seed and per image, and
  as smooth as the data rather than noise."""
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.sample.sampler = 'ddpm'
  config.sample.num_images = 2
  config.sample.progressive = False
  seen = []
  real = samplers.sample

  def recording(schedule, model_fn, x_T, rng, **kwargs):
    def model(x, t):
      jax.debug.callback(lambda t: seen.append(np.asarray(t)), t)
      return model_fn(x, t)
    return real(schedule, model, x_T, rng, **kwargs)

  monkeypatch.setattr(samplers, 'sample', recording)  # What train.make_sample_fn calls.
  written = {}
  for seed in (1, 2):
    config.sample.seed = seed
    config.sample.output_dir = str(tmp_path / f'seed{seed}')
    written[seed] = imageio.load_images(sample.generate(config, workdir))[0]
  T = config.diffusion.num_timesteps
  assert all(len(set(t.tolist())) == 1 for t in seen)  # One timestep per call for the batch.
  assert sorted(int(t[0]) for t in seen) == sorted(list(range(T)) * 2)  # Each once per run.
  a, b = written[1], written[2]
  assert a.shape == b.shape == (2, 16, 16, 3)
  assert np.abs(a.astype(int) - b).mean() > 10       # Another seed, other images.
  assert np.abs(a[0].astype(int) - a[1]).mean() > 10  # Two noises, two images.
  data_images = data.load_dataset(config.data)[:64]
  noise = imageio.to_uint8(np.random.default_rng(0).normal(size=a.shape))
  for x in (a, b):
    assert _roughness(x) < 0.5 * _roughness(noise), (_roughness(x), _roughness(data_images))
    assert x.std() > 10  # Not one flat colour either.


def test_checkpoint_round_trip_gives_identical_outputs(trained):
  config, workdir, state = trained
  model, params = sample.restore_params(config, workdir, use_ema=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  t = jnp.array([3, 70])
  before = model.apply({'params': state.ema_params}, x, t)
  after = model.apply({'params': params}, x, t)
  np.testing.assert_array_equal(np.asarray(before), np.asarray(after))


def test_the_condition_draws_independently_of_the_loss():
  """train_step's `condition(rng, x0)` gets a key used for nothing else. A probe model that
  predicts the condition's normal draw, made from the key it is given as draw_t_eps makes
  eps, has a loss of about 2 (two independent N(0, 1) draws), not 0 (one draw twice)."""
  import functools  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from common import params as params_lib  # pylint: disable=g-import-not-at-top
  from ddpm import diffusion  # pylint: disable=g-import-not-at-top

  class Probe(nn.Module):
    @nn.compact
    def __call__(self, x, t, train=False, probe=None):
      return probe + self.param('w', nn.initializers.zeros, ())

  config = tiny_config()  # prediction='eps', min_snr_gamma=0: loss = mean((probe - eps)^2).
  schedule, rules = train.build_schedule(config), params_lib.Rules()
  tx = train.make_optimizer(config, rules)
  state = train.new_state({'w': jnp.zeros(())}, tx, rules, jax.random.PRNGKey(0))
  condition = lambda rng, x0: {'probe': diffusion.draw_t_eps(schedule, rng, x0)[1]}
  step = jax.jit(functools.partial(train.train_step, config=config, model=Probe(),
                                   schedule=schedule, tx=tx, rules=rules, condition=condition))
  for i in range(3):
    state, metrics = step(state, jnp.zeros((16, 16, 16, 3), jnp.uint8))
    assert 1.8 < float(metrics['loss']) < 2.2, (i, float(metrics['loss']))


def test_resumed_run_matches_uninterrupted_run(tmp_path):
  config = tiny_config()
  config.optim.lr_schedule = 'constant'
  config.train.num_steps = 60
  full = train.train_and_evaluate(config, str(tmp_path / 'full'))

  # The same run in a subprocess, SIGTERM'd after its first checkpoint, then restarted.
  config_file = write_tiny_config_file(tmp_path, "c.optim.lr_schedule = 'constant'",
                                       'c.train.num_steps = 60')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'ddpm.main', f'--config={config_file}',
       f'--workdir={tmp_path / "split"}'],
      cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED='1'), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT)
  ckpt_dir = tmp_path / 'split' / 'checkpoints'
  deadline = time.time() + 240
  while not (ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    assert time.time() < deadline, 'no checkpoint within 240 s'
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0].decode()
  assert proc.returncode == 0, out[-3000:]
  stopped = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  assert f'Stopped at step {stopped}' in out, out[-3000:]
  assert 5 <= stopped < 60, 'SIGTERM came too late to interrupt the run'
  # What the user read: our lines only, one per log interval, and no silent compilation.
  for noise in ('oneDNN', 'absl::InitializeLog', 'Unable to initialize backend', 'Traceback',
                'logging_writer', '+----'):
    assert noise not in out, out[-3000:]
  logged = re.findall(r'step (\d+)/60 ', out)
  assert logged and len(logged) == len(set(logged)), out[-3000:]
  assert 'Compiling the U-Net train step...' in out and 'Done compiling the U-Net train step in' in out

  resumed = train.train_and_evaluate(config, str(tmp_path / 'split'))
  assert int(resumed.step) == 60
  assert tree_equal(params_of(resumed), params_of(full))
  assert tree_equal(jax.device_get(resumed.ema_params), jax.device_get(full.ema_params))


@pytest.mark.slow  # A subprocess on 8 devices (~30 s); test_seam.py's layout test covers more.
def test_eight_devices_give_the_same_loss_as_one():
  script = f"""
import sys; sys.path.insert(0, {str(REPO / 'tests')!r})
import jax, numpy as np
from test_ddpm_train import tiny_config
from common import data, mesh as mesh_lib
from ddpm import train
config = tiny_config()
mesh = mesh_lib.make_mesh()
model, schedule, tx = train.build_model(config), train.build_schedule(config), train.make_optimizer(config)
state = train.create_train_state(config, model, tx, mesh)
step = train.make_train_step(config, model, schedule, tx, mesh)
batch = next(data.BatchIterator(data.load_dataset(config.data), 16, seed=0))
state, metrics = step(state, mesh_lib.shard_batch(batch, mesh))
print('RESULT', len(jax.devices()), float(metrics['loss']), float(metrics['grad_norm']))
"""
  results = {}
  for n in (1, 8):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={n}')
    out = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    line = [l for l in out.stdout.splitlines() if l.startswith('RESULT')]
    assert line, out.stderr[-3000:]
    _, devices, loss, grad_norm = line[0].split()
    assert int(devices) == n
    results[n] = (float(loss), float(grad_norm))
  np.testing.assert_allclose(results[8], results[1], rtol=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny_config()
  config.train.num_steps = 5
  good = train.train_and_evaluate(config, str(tmp_path))
  config.train.num_steps = 20
  config.optim.learning_rate = 1e30
  config.optim.warmup_steps = 0
  with pytest.raises(FloatingPointError, match='Non-finite.*last checkpoint'):
    train.train_and_evaluate(config, str(tmp_path))
  ckpt = checkpoint.Checkpointer(tmp_path, 5)
  assert ckpt.latest_step() == 5
  restored = ckpt.restore(good)
  ckpt.close()
  assert tree_equal(params_of(restored), params_of(good))


# --- Errors that must come before any compute ------------------------------------------------

def test_unknown_schedule_is_rejected_naming_the_key(tmp_path):
  config = tiny_config()
  config.diffusion.schedule = 'quadratic'
  with pytest.raises(ValueError, match=r"diffusion.schedule='quadratic'.*'cosine'"):
    train.train_and_evaluate(config, str(tmp_path))


def test_image_size_incompatible_with_model(tmp_path):
  config = tiny_config()
  config.data.image_size = 15
  with pytest.raises(ValueError, match='data.image_size=15 must be divisible'):
    train.train_and_evaluate(config, str(tmp_path))


def test_image_size_different_from_folder(tmp_path):
  folder = tmp_path / 'faces'
  for i in range(3):
    imageio.save_image(np.full((24, 24, 3), 40 * i, np.uint8), folder / f'{i}.png')
  config = tiny_config(folder)
  config.data.resize = False
  with pytest.raises(ValueError, match='are 24x24 but the config says data.image_size=16'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_empty_folder(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match=r'empty.*holds no image file'):
    train.train_and_evaluate(tiny_config(tmp_path / 'empty'), str(tmp_path / 'run'))


def test_folder_of_corrupt_files(tmp_path):
  folder = tmp_path / 'corrupt'
  folder.mkdir()
  for i in range(3):
    (folder / f'{i}.jpg').write_bytes(b'not a jpeg' * i)
  with pytest.raises(ValueError, match=r'corrupt has no readable image: all 3 file'):
    train.train_and_evaluate(tiny_config(folder), str(tmp_path / 'run'))


@pytest.mark.parametrize('override,message', [
    ('--config.train.num_stepz=5', 'num_stepz'),               # Unknown key.
    ('--config.sample.sampler=lms', "sample.sampler='lms'"),  # Bad value.
])
def test_cli_rejects_bad_config_before_compute(tmp_path, override, message):
  out = subprocess.run(
      [sys.executable, '-m', 'ddpm.main', '--config=ddpm/configs/demo.py',
       f'--workdir={tmp_path}', override],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert message in out.stderr
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize('name', ['demo', 'anime64', 'cifar10'])
def test_shipped_configs_validate_and_have_expected_size(name):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'ddpm.configs.{name}').get_config()
  default.validate(config)
  model = train.build_model(config)
  size = config.data.image_size
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                             jnp.zeros((1,), jnp.int32)))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
  expected = {'demo': (0.3e6, 2e6), 'anime64': (25e6, 35e6), 'cifar10': (35.7e6, 35.8e6)}[name]
  assert expected[0] <= count <= expected[1], count


@pytest.mark.slow  # Three jobs of their own (~4 min on 2 busy cores): CI's slow tier runs it.
def test_two_process_run_matches_one_process(tmp_path):
  """A cluster job in miniature: 2 processes x 2 CPU devices (gloo), the state sharded over
  an fsdp axis of all 4 devices (so it spans both processes), against 1 x 4 data-parallel."""
  import socket  # pylint: disable=g-import-not-at-top
  steps = ('c.train.num_steps = 6', 'c.train.checkpoint_every = 3')
  config_file = write_tiny_config_file(tmp_path, *steps)
  fsdp_config_file = write_tiny_config_file(tmp_path, *steps, 'c.mesh.fsdp = 4',
                                            'c.params.min_shard_size = 0', name='tiny_fsdp')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]

  def launch(workdir, n_proc, devices_per_proc, pid, config_file=config_file):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices_per_proc),
               JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', PYTHONUNBUFFERED='1')
    env.pop('XLA_FLAGS', None)
    if n_proc > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(n_proc),
                 JAX_PROCESS_ID=str(pid))
    return subprocess.Popen(
        [sys.executable, '-m', 'ddpm.main', f'--config={config_file}', f'--workdir={workdir}'],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

  procs = [launch(tmp_path / 'multi', 2, 2, i, fsdp_config_file) for i in range(2)]
  procs.append(launch(tmp_path / 'single', 1, 4, 0))
  outs = []
  for p in procs:
    outs.append(p.communicate(timeout=400)[0].decode())
    assert p.returncode == 0, outs[-1][-4000:]
  assert 'State sharded over fsdp=4' in outs[0], outs[0][-4000:]

  config = tiny_config()
  restored = {}
  for name in ('multi', 'single'):
    ckpt = checkpoint.Checkpointer(tmp_path / name, 3)
    assert ckpt.all_steps() == [3, 6]
    target = jax.eval_shape(lambda: train.init_state(config, train.build_model(config),
                                                     train.make_optimizer(config)))
    restored[name] = ckpt.restore(target)
    ckpt.close()
  # Reduction order differs between the layouts and Adam normalises near-zero gradients,
  # so compare the discrepancy with how far training moved the weights.
  init = train.init_state(config, train.build_model(config), train.make_optimizer(config)).params
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  multi, single, start = flat(restored['multi'].params), flat(restored['single'].params), flat(init)
  assert np.linalg.norm(multi - single) < 1e-2 * np.linalg.norm(single - start)
