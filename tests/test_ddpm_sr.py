"""Super-resolution (ddpm/sr.py): the conditioning path, a tiny model that learns,
--mode=upscale's outputs and its bad inputs (one `error:` line, exit status 2)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from common import data, errors, imageio
from common.logs import read_scalars
from ddpm import main as ddpm_main, schedules, sr
from ddpm.configs import sr_base

REPO = Path(__file__).resolve().parents[1]
# Mean |box_down(upscaled) - input| in uint8 levels that the tiny trained model meets: over 16
# held-out digits, measured 22-38 (bicubic: 6-11; the model's samples are still grainy after
# 80 steps), against at least 56 for a flat image of the input's mean colour and 73 for noise.
TOLERANCE = 45.0


def tiny_config():
  """Digits at 16x16 from 8x8 (x2) and 4x4 (x4); a 2-level convolutional U-Net."""
  config = sr_base.get_config()
  config.data.source = 'digits'
  config.data.image_size = 16
  config.sr.factors = (2, 4)
  config.sr.holdout = 64
  config.sr.max_noise_level = 15
  m = config.model
  m.block_out_channels = (16, 32)
  m.layers_per_block = 1
  m.attention_resolutions = ()
  m.mid_attention = False
  m.norm_groups = 8
  config.diffusion.schedule = 'cosine'
  config.diffusion.num_timesteps = 100
  config.diffusion.prediction = 'v'
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 10
  t = config.train
  t.batch_size = 16
  t.num_steps = 80
  t.log_every = 10
  t.checkpoint_every = 80
  t.sample_every = 0
  t.ema_decay = 0.9
  t.async_checkpoint = False
  s = config.sample
  s.sampler = 'ddim'
  s.num_steps = 4
  s.noise_level = 5
  s.batch_size = 4
  return config


def tiny_model(size=16):
  return sr.SRUNet(sample_size=size, block_out_channels=(16, 32), layers_per_block=1,
                   attention_resolutions=(), mid_attention=False, norm_groups=8)


def random_params(model, *args, **kwargs):
  """Parameters of init's shapes, drawn on the host: compiling init's many initialisers
  costs more than these tests."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args, **kwargs)['params']
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(np.float32), shapes)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('sr_run')
  state = sr.train_and_evaluate(tiny_config(), str(workdir))
  return workdir, state


# --- The conditioning path --------------------------------------------------------------------

def test_model_takes_twice_the_channels_and_the_noise_level():
  model = tiny_model()
  x, t = jnp.ones((2, 16, 16, 3)), jnp.array([3, 50])
  cond = jnp.linspace(-1, 1, 2 * 16 * 16 * 3).reshape(2, 16, 16, 3)
  params = random_params(model, x, t, low_res=cond, noise_level=jnp.array([0, 0]))
  assert params['conv_in']['kernel'].shape == (3, 3, 6, 16)  # [x_t, low_res] on the channels.
  assert 'noise_level_embedding' in params and 'time_embedding' in params
  # Jitted: one compilation per shape, not one per operation.
  apply = jax.jit(lambda x, cond, level: model.apply({'params': params}, x, t, low_res=cond,
                                                     noise_level=level))
  out = lambda cond, level: apply(x, cond, jnp.asarray(level))
  base = out(cond, [0, 0])
  assert base.shape == (2, 16, 16, 3)
  assert not np.allclose(base, out(cond[::-1], [0, 0]))       # The conditioning is seen,
  moved = np.abs(out(cond, [0, 90]) - base).max(axis=(1, 2, 3))
  assert moved[0] == 0 and moved[1] > 0                        # and so is each example's level.
  # Crops (sr.crop_size) run through the same parameters.
  assert apply(x[:, :8, :8], cond[:, :8, :8], jnp.array([0, 0])).shape == (2, 8, 8, 3)


def test_wrong_conditioning_is_a_clear_error():
  model = tiny_model()
  x, t = jnp.ones((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32)
  params = {'params': random_params(model, x, t, low_res=x, noise_level=t)}
  with pytest.raises(ValueError, match=r'low_res of the same shape.*\(1, 16, 16, 3\) and '
                                       r'\(1, 4, 4, 3\)'):
    model.apply(params, x, t, low_res=jnp.ones((1, 4, 4, 3)), noise_level=t)  # Not upsampled.
  with pytest.raises(ValueError, match='needs low_res'):
    model.apply(params, x, t)
  with pytest.raises(ValueError, match='S a multiple of 2 up to 16'):
    model.apply(params, jnp.ones((1, 32, 32, 3)), t, low_res=jnp.ones((1, 32, 32, 3)),
                noise_level=t)


def test_degradation_maths():
  blocks = np.kron(np.arange(16.0).reshape(1, 4, 4, 1), np.ones((1, 4, 4, 3))) / 16 - 0.5
  x = jnp.asarray(blocks, jnp.float32)                          # 4x4 constant blocks.
  np.testing.assert_allclose(sr.downsample(x, 4), blocks[:, ::4, ::4], atol=1e-6)
  assert sr.downsample(x, 2, 'bicubic').shape == (1, 8, 8, 3)
  lr = sr.low_res(x, 4)
  np.testing.assert_allclose((lr + 1) * 127.5, np.round((lr + 1) * 127.5), atol=1e-3)  # 8 bits.
  up = sr.upsample(lr, 16)
  assert up.shape == (1, 16, 16, 3) and float(up.min()) >= -1 and float(up.max()) <= 1
  # Training: a factor per example, noise up to the maximum level; at level 0 (almost) clean.
  schedule = schedules.make_schedule('linear', 100)
  x0 = jax.random.uniform(jax.random.PRNGKey(1), (8, 16, 16, 3), minval=-1, maxval=1)
  out = sr.training_condition(jax.random.PRNGKey(2), x0, factors=(2,), method='box',
                              noise_schedule=schedule, max_noise_level=0)
  assert out['low_res'].shape == x0.shape and not out['noise_level'].any()
  sigma_0 = float(schedule.sqrt_one_minus_alphas_cumprod[0])   # The least noise: s = 0.
  np.testing.assert_allclose(out['low_res'], sr.upsample(sr.low_res(x0, 2), 16), atol=6 * sigma_0)
  out = sr.training_condition(jax.random.PRNGKey(2), x0, factors=(2, 4), method='box',
                              noise_schedule=schedule, max_noise_level=30)
  assert 0 <= int(out['noise_level'].min()) and int(out['noise_level'].max()) <= 30


def test_crops_are_deterministic_and_on_the_factor_grid():
  images = np.arange(4 * 16 * 16 * 3, dtype=np.uint32).reshape(4, 16, 16, 3)

  class Batches:
    step = 3

    def __next__(self):
      return images

  a, b = sr.CropIterator(Batches(), 8, (2, 4), seed=0), sr.CropIterator(Batches(), 8, (2, 4), 0)
  crops = next(a)
  np.testing.assert_array_equal(crops, next(b))
  assert crops.shape == (4, 8, 8, 3)
  rows, cols = (crops[:, 0, 0, 0] // 3) // 16 % 16, (crops[:, 0, 0, 0] // 3) % 16
  assert not (rows % 4).any() and not (cols % 4).any()


def test_config_checks_name_the_key():
  config = tiny_config()
  sr_base.validate(config)
  for key, value, message in [('factors', (3,), 'sr.factors'),
                              ('downsample', 'lanczos', 'sr.downsample'),
                              ('max_noise_level', 100, 'sr.max_noise_level'),
                              ('crop_size', 6, 'sr.crop_size')]:
    bad = tiny_config()
    bad.sr[key] = value
    with pytest.raises(ValueError, match=message):
      sr_base.validate(bad)
  bad = tiny_config()
  bad.sr.crop_size, bad.model.attention_resolutions = 8, (8,)
  with pytest.raises(ValueError, match='attention_resolutions'):
    sr_base.validate(bad)


def test_sample_mode_keys_are_not_sr_keys():
  """--mode=upscale upscales every input and draws no figure: ddpm's sample.num_images and
  sample.progressive (--mode=sample's) are no keys of an SR config, and setting one is an
  unknown-key error naming it, as any mistyped key."""
  from common import launch  # pylint: disable=g-import-not-at-top
  from ddpm.configs import sr_anime  # pylint: disable=g-import-not-at-top
  for config in (tiny_config(), sr_anime.get_config()):
    assert 'num_images' not in config.sample and 'progressive' not in config.sample
    sr_base.validate(config)
  for key, value in (('num_images', 5), ('progressive', True)):
    bad = tiny_config()
    bad.sample[key] = value
    with pytest.raises(errors.UnknownKeyError, match=f"'config.sample.{key}'"):
      sr_base.validate(bad)
    assert launch.unknown_override(sr_anime.get_config(), [f'sample.{key}']).startswith(
        f'unknown config key sample.{key}')


# --- Training and --mode=upscale on a tiny trained workdir ------------------------------------

def test_loss_falls(trained):
  workdir, state = trained
  assert int(state.step) == 80
  losses = [v for _, v in read_scalars(workdir, 'loss')]
  assert len(losses) == 8 and all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < 0.7 * losses[0], losses


def _low_res_folder(folder: Path) -> dict[str, int]:
  """Held-out digits box-downsampled to 8x8 (x2) and 4x4 (x4), one in a subfolder (a JPEG):
  {relative path: side}."""
  digits = data.load_dataset(tiny_config().data)[-3:]  # In sr.holdout: never trained on.
  files = {'a.png': 8, 'sub/b.jpg': 4, 'c.png': 8}
  for (name, side), image in zip(files.items(), digits):
    imageio.save_image(sr.degrade_uint8(image[None], 16 // side, 'box')[0], folder / name)
  return files


def box_down(image: np.ndarray, factor: int) -> np.ndarray:
  h, w, c = image.shape
  return image.astype(np.float32).reshape(h // factor, factor, w // factor, factor, c).mean((1, 3))


def test_upscale_writes_one_image_per_input_under_its_name(trained, tmp_path):
  workdir, _ = trained
  inputs = tmp_path / 'low'
  files = _low_res_folder(inputs)
  before = {p: p.read_bytes() for p in inputs.rglob('*') if p.is_file()}
  config = tiny_config()
  config.sample.input = str(inputs)
  out = sr.upscale(config, workdir)
  assert out == workdir / 'upscaled'
  written = sorted(str(p.relative_to(out)) for p in out.rglob('*') if p.is_file())
  assert written == sorted(files)
  rng = np.random.default_rng(0)
  for name, side in files.items():
    with Image.open(out / name) as im:
      assert im.size == (16, 16) and im.mode == 'RGB'
    # Each output upscales its own input: box-downsampled back it is the input within
    # TOLERANCE, where noise or a flat image of the input's mean colour is not.
    low = imageio.read_image(inputs / name).astype(np.float32)
    error = lambda y: float(np.abs(box_down(y, 16 // side) - low).mean())
    ours = error(imageio.read_image(out / name))
    assert ours < TOLERANCE, (name, ours)
    assert error(rng.integers(0, 256, (16, 16, 3))) > TOLERANCE
    assert error(np.full((16, 16, 3), low.mean((0, 1)))) > TOLERANCE
  assert before == {p: p.read_bytes() for p in inputs.rglob('*') if p.is_file()}  # Untouched.
  # Never into the input folder.
  config.sample.output_dir = str(inputs / 'up')
  with pytest.raises(errors.ConfigError, match='inputs are never overwritten'):
    sr.upscale(config, workdir)


def test_modes_refuse_the_other_kind_of_config(tmp_path):
  with pytest.raises(errors.ConfigError, match='--mode=upscale'):
    ddpm_main.generate(tiny_config(), tmp_path)
  from ddpm.configs import demo  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match='super-resolution config'):
    ddpm_main.upscale(demo.get_config(), tmp_path)


def test_bad_inputs_are_one_error_line_with_status_2(trained, tmp_path):
  """Missing folder, an unreadable file, a size the model does not upscale: through the
  command (the three at once: each is mostly interpreter start-up)."""
  workdir, _ = trained
  config_file = tmp_path / 'tiny_sr.py'
  config_file.write_text(f'import sys\nsys.path.insert(0, {str(REPO / "tests")!r})\n'
                         'from test_ddpm_sr import tiny_config as get_config\n')
  unreadable, wrong_size = tmp_path / 'unreadable', tmp_path / 'wrong_size'
  _low_res_folder(unreadable)
  (unreadable / 'broken.png').write_bytes(b'not a png')
  _low_res_folder(wrong_size)
  imageio.save_image(np.zeros((5, 5, 3), np.uint8), wrong_size / 'odd.png')
  cases = {tmp_path / 'nope': f'error: Image folder {tmp_path / "nope"} does not exist.',
           unreadable: f'error: {unreadable / "broken.png"} cannot be read as an image',
           wrong_size: f'error: {wrong_size / "odd.png"} is 5x5, but this model upscales '
                       '8x8 (x2), 4x4 (x4) to 16x16'}
  procs = {folder: subprocess.Popen(
      [sys.executable, '-m', 'ddpm.main', f'--config={config_file}', f'--workdir={workdir}',
       '--mode=upscale', f'--config.sample.input={folder}'],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=str(REPO))) for folder in cases}
  # ddpm's --mode=sample keys are not SR keys: setting one is the usual unknown-key error.
  cases['sample.num_images'] = 'error: unknown config key sample.num_images'
  procs['sample.num_images'] = subprocess.Popen(
      [sys.executable, '-m', 'ddpm.main', f'--config={config_file}', f'--workdir={workdir}',
       '--mode=upscale', f'--config.sample.input={unreadable}', '--config.sample.num_images=5'],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=str(REPO)))
  for folder, expected in cases.items():
    stdout, stderr = procs[folder].communicate(timeout=120)
    assert 'Traceback' not in stdout + stderr, stderr
    lines = [l for l in stderr.splitlines() if l.startswith('error:')]
    assert len(lines) == 1 and lines[0].startswith(expected), stderr
    assert procs[folder].returncode == 2
  assert not (workdir / 'upscaled' / 'odd.png').exists()
