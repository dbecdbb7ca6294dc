"""latent/ stage 2 end to end on tiny models: training, resume, sampling, img2img, inpainting, errors.

One tiny VAE and one tiny text-conditioned LDM are trained once for the module
(scikit-learn digits, 16x16, no download); the tests share them.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import checkpoint, data, imageio
from common.logs import read_scalars
from latent.ldm import sample, sampler, train
from latent.vae import codec, train as vae_train
from latent.configs import ldm_demo, vae_demo


def tiny_vae_config():
  config = vae_demo.get_config()
  config.vae.block_out_channels = (16, 32, 32)
  config.train.batch_size = 16
  config.train.num_steps = 10
  config.train.log_every = 5
  config.train.checkpoint_every = 10
  config.train.eval_every = 10
  config.train.num_eval_images = 16
  config.train.scale_factor_images = 64
  config.train.async_checkpoint = False
  return config


def tiny_ldm_config(vae_workdir):
  config = ldm_demo.get_config()
  config.vae_workdir = str(vae_workdir)
  config.conditioning.width = 32
  config.conditioning.heads = 2
  config.model.block_out_channels = (32, 64)
  config.model.head_dim = 16
  config.model.norm_groups = 8
  config.diffusion.num_timesteps = 100
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 10
  config.train.batch_size = 32
  config.train.num_steps = 150
  config.train.log_every = 25
  config.train.checkpoint_every = 75
  config.train.sample_every = 150
  config.train.num_grid_samples = 10
  config.train.ema_decay = 0.9
  config.train.async_checkpoint = False
  config.sample.num_steps = 8
  config.sample.num_per_prompt = 3
  config.sample.batch_size = 4
  return config


@pytest.fixture(scope='module')
def vae_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('vae')
  vae_train.train_and_evaluate(tiny_vae_config(), str(workdir))
  return workdir


@pytest.fixture(scope='module')
def ldm_run(vae_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('ldm')
  config = tiny_ldm_config(vae_dir)
  state = train.train_and_evaluate(config, str(workdir))
  return config, workdir, state


def tiny_cached_ldm(dropout: float = 0.0):
  """(a tiny class-conditioned LatentDenoiser on 8x8x4 latents, a batch of 16 examples as
  cached posterior moments): stage 2's step without a VAE (the LDM layouts use it too)."""
  from latent.ldm.unet import ClassEncoder, ConditionalUNet, LatentDenoiser  # pylint: disable=g-import-not-at-top
  unet = ConditionalUNet(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                         layers_per_block=1, attention_resolutions=(4,), head_dim=8, norm_groups=8,
                         dropout=dropout, name='unet')
  rng = np.random.default_rng(0)
  batch = {'ids': rng.integers(0, 10, (16, 1)).astype(np.int32),
           'mean': rng.standard_normal((16, 2, 8, 8, 4)).astype(np.float32),
           'std': np.full((16, 2, 8, 8, 4), 0.1, np.float32)}
  return LatentDenoiser(unet, ClassEncoder(10, 32), 1, 32), batch


def params_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


def test_ldm_loss_falls_and_writes_a_prompt_grid(ldm_run):
  config, workdir, state = ldm_run
  assert int(state.step) == config.train.num_steps
  losses = [v for _, v in read_scalars(workdir, 'loss')]
  assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
  grid = imageio.read_image(workdir / 'samples_during_training' / f'{150:08d}.png')
  assert grid.shape[0] > 10 * 64  # Ten captioned rows of enlarged 16x16 digits.
  assert (workdir / train.CACHE).is_file() and (workdir / 'conditioning.json').is_file()


def test_ldm_resume_is_bit_identical(ldm_run, tmp_path, monkeypatch):
  config, _, state = ldm_run
  config = config.copy_and_resolve_references()
  config.train.sample_every = 0
  with monkeypatch.context() as m:  # A preemption (SIGTERM) noticed at step 40.
    m.setattr(checkpoint.PreemptionGuard, 'should_stop', lambda self, step: step == 40)
    stopped = train.train_and_evaluate(config, str(tmp_path))
  assert int(stopped.step) == 40
  resumed = train.train_and_evaluate(config, str(tmp_path))
  assert params_equal(resumed.params, state.params)
  assert params_equal(resumed.ema_params, state.ema_params)
  # Round trip: what sampling restores is the trained EMA.
  _, params, conds, _ = sample.restore(config, tmp_path)
  assert params_equal(params, state.ema_params) and conds.kind == 'text'


def test_sampling_prompts_writes_numbered_files_and_captioned_grid(ldm_run, tmp_path):
  config, workdir, _ = ldm_run
  config = config.copy_and_resolve_references()
  config.sample.output_dir = str(tmp_path / 'out')
  config.sample.prompts = ('digit one', 'digit two')
  out = sample.generate(config, workdir)
  files = sorted(p.name for p in out.glob('*.jpg'))
  assert files == sorted(f'{i}.jpg' for i in range(1, 7))
  assert imageio.read_image(out / '1.jpg').shape == (16, 16, 3)
  rows = (out / 'captions.tsv').read_text().splitlines()
  assert rows[0] == 'file\tcaption' and rows[1] == '1.jpg\tdigit one' and rows[6] == '6.jpg\tdigit two'
  assert (tmp_path / 'out_grid.png').is_file()


def _one_prompt_setup(config, workdir):
  model, params, conds, stage1 = sample.restore(config, workdir)
  schedule = train.ddpm_train.build_schedule(config)
  ids = jnp.asarray(np.repeat(conds.prompt_ids(['digit four']), 2, axis=0))
  images = data.load_captioned_dataset(config.data)[0][:2]
  mean, _ = stage1.moments(stage1.params, images)
  u = model.unet
  noise = jax.random.normal(jax.random.PRNGKey(3), (2, u.sample_size, u.sample_size, u.in_channels))
  return model, params, stage1, schedule, ids, images, stage1.scale_factor * mean, noise


def test_img2img_strength_zero_is_the_vae_reconstruction(ldm_run):
  config, workdir, _ = ldm_run
  model, params, stage1, schedule, ids, images, init_z0, noise = _one_prompt_setup(config, workdir)
  fn = sampler.for_config(config, model, schedule, stage1, strength=0.0)
  got = fn(params, stage1.params, jax.random.PRNGKey(0), ids, noise, 3.0, init_z0)
  recon = stage1.model.apply({'params': stage1.params}, images.astype(np.float32) / 127.5 - 1,
                             method=stage1.model.__call__)[0]  # Decodes the posterior mode.
  np.testing.assert_allclose(got, recon, atol=1e-5)
  # A real strength moves away from it.
  fn = sampler.for_config(config, model, schedule, stage1, strength=0.7)
  moved = fn(params, stage1.params, jax.random.PRNGKey(0), ids, noise, 3.0, init_z0)
  assert float(jnp.abs(moved - recon).mean()) > 1e-3


def test_inpainting_keeps_the_known_latent_region(ldm_run):
  config, workdir, _ = ldm_run
  model, params, stage1, schedule, ids, _, init_z0, noise = _one_prompt_setup(config, workdir)
  h = init_z0.shape[1]
  keep = jnp.zeros((2, h, h, 1)).at[:, :, :h // 2].set(1.0)  # Keep the left half.
  fn = sampler.for_config(config, model, schedule, stage1, inpaint=True, decode=False)
  z = fn(params, stage1.params, jax.random.PRNGKey(0), ids, noise, 3.0, init_z0, keep)
  np.testing.assert_array_equal(z[:, :, :h // 2], init_z0[:, :, :h // 2])
  assert float(jnp.abs(z[:, :, h // 2:] - init_z0[:, :, h // 2:]).mean()) > 1e-2


def test_inpainting_from_the_command_line_keeps_the_picture_where_the_mask_is_dark(ldm_run,
                                                                                  tmp_path):
  config, workdir, _ = ldm_run
  config = config.copy_and_resolve_references()
  picture = tmp_path / 'picture.png'
  pixels = np.asarray(data.load_captioned_dataset(config.data)[0][5])
  imageio.save_image(pixels, picture)
  config.sample.init_image = str(picture)
  config.sample.strength = 1.0

  def inpaint(mask, name):
    imageio.save_image(mask, tmp_path / f'{name}.png')
    config.sample.mask = str(tmp_path / f'{name}.png')
    config.sample.output_dir = str(tmp_path / name)
    return imageio.load_images(sample.generate(config, workdir))[0].astype(np.float32)

  # All dark: every latent is the picture's, so every sample is its VAE reconstruction (the
  # tiny VAE's decoder mixes the whole 4x4 latent grid, so a partial mask is checked on the
  # latent grid instead, in test_inpainting_keeps_the_known_latent_region).
  kept = inpaint(np.zeros((16, 16, 3), np.uint8), 'keep_all')
  assert len(kept) == 6  # Two prompts x 3.
  _, _, _, stage1 = sample.restore(config, workdir)
  recon = imageio.to_uint8(stage1.decode(stage1.params, stage1.encode(stage1.params,
                                                                     pixels[None])))[0]
  imageio.save_image(recon, tmp_path / 'recon.jpg')  # Through the same JPEG encoder.
  recon = imageio.read_image(tmp_path / 'recon.jpg').astype(np.float32)
  assert np.abs(kept - recon).max() <= 2, np.abs(kept - recon).max()
  mask = np.zeros((16, 16, 3), np.uint8)
  mask[:, 8:] = 255  # Generate the right half.
  mask[3, :8] = 255  # A thin stroke in the kept half, on no row diffusers' mask samples.
  half = inpaint(mask, 'half')
  keep = sample.read_mask(tmp_path / 'half.png', 16, 4)
  assert keep[0, :, :2, 0].all() and not keep[0, :, 2:, 0].any()
  # Generated where white: the samples leave the reconstruction and differ from each other.
  assert np.abs(half - recon).mean() > 5
  assert np.abs(half[1:] - half[:1]).mean() > 5


def test_long_prompt_is_truncated_with_a_warning(ldm_run, caplog):
  config, workdir, _ = ldm_run
  _, _, conds, _ = sample.restore(config, workdir)
  with caplog.at_level(logging.WARNING):
    ids = conds.prompt_ids(['digit one digit two digit three'])
  assert 'truncated to the maximum length 4' in caplog.text
  assert ids.shape == (1, 4)


def test_missing_vae_workdir_is_named(tmp_path):
  config = tiny_ldm_config(tmp_path / 'no_vae_here')
  with pytest.raises(FileNotFoundError, match='no_vae_here.*train stage 1 first'):
    train.train_and_evaluate(config, str(tmp_path / 'ldm'))
  assert not (tmp_path / 'ldm').exists()  # Failed before touching the workdir.


def test_config_errors_name_the_key(tmp_path):
  config = tiny_ldm_config(tmp_path)
  config.conditioning.kind = 'caption'
  with pytest.raises(ValueError, match="conditioning.kind='caption'"):
    train.train_and_evaluate(config, str(tmp_path / 'ldm'))
  config = tiny_ldm_config(tmp_path)
  with pytest.raises(KeyError, match='guidance'):
    config.sample.guidance = 2.0
    train.ldm_base.validate(config)


def test_unknown_class_prompt_is_an_error(ldm_run, tmp_path):
  config, workdir, _ = ldm_run
  config = config.copy_and_resolve_references()
  config.conditioning.kind = 'class'
  config.train.num_steps = 1
  config.train.sample_every = 0
  config.sample.prompts = ('digit eleven',)
  class_dir = tmp_path / 'class'
  train.train_and_evaluate(config, str(class_dir))
  with pytest.raises(ValueError, match="Unknown class in prompt 'digit eleven'.*zero, one"):
    sample.generate(config, class_dir)
  config.sample.prompts = ('seven',)
  config.sample.output_dir = str(tmp_path / 'out')
  assert len(list(sample.generate(config, class_dir).glob('*.jpg'))) == 3
  assert checkpoint.Checkpointer(class_dir, read_only=True).latest_step() == 1


def test_a_vae_trained_sharded_loads_on_this_process_devices(tmp_path):
  """Stage 1 trained on 2 devices with its state FSDP-sharded (a subprocess) restores on this
  process's one device with the very weights training ended with."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  script = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
import jax, numpy as np
from test_latent_ldm import tiny_vae_config
from latent.vae import train as vae_train
config = tiny_vae_config()
config.mesh.fsdp = 2
config.params.min_shard_size = 0  # Shard every array, however small.
state = vae_train.train_and_evaluate(config, {str(tmp_path / 'vae')!r})
leaves = jax.tree.leaves(state.params)
assert any(len(x.sharding.device_set) == 2 and not x.sharding.is_fully_replicated for x in leaves)
np.savez({str(tmp_path / 'trained.npz')!r}, *[np.asarray(x) for x in leaves],
         scale=np.float32(state.scale_factor))
"""
  env = dict(__import__('os').environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  _, params, scale_factor, config = codec.load_vae(tmp_path / 'vae')
  assert config.mesh.fsdp == 2 and jax.device_count() == 1
  trained = np.load(tmp_path / 'trained.npz')
  assert scale_factor == float(trained['scale'])
  leaves = jax.tree.leaves(params)
  assert len(leaves) == len(trained.files) - 1
  for i, leaf in enumerate(leaves):
    np.testing.assert_array_equal(np.asarray(leaf), trained[f'arr_{i}'])


def test_latent_cache_is_rebuilt_for_other_vae_weights(ldm_run, tmp_path, caplog):
  """The same data, step and scale factor, but other weights (a stage 1 retrained in the same
  vae_workdir): the cache is not reused."""
  config, _, _ = ldm_run
  _, _, _, stage1 = sample.restore(config, ldm_run[1])
  images = data.load_captioned_dataset(config.data)[0][:8]
  first = train.latent_cache(tmp_path, stage1, images, 8)
  with caplog.at_level(logging.INFO):
    again = train.latent_cache(tmp_path, stage1, images, 8)
  assert 'Using the latent cache' in caplog.text
  np.testing.assert_array_equal(again['mean'], first['mean'])
  retrained = codec.Codec(stage1.model, jax.tree.map(lambda p: p * 1.01, stage1.params),
                          stage1.scale_factor, stage1.step)
  caplog.clear()
  with caplog.at_level(logging.INFO):
    rebuilt = train.latent_cache(tmp_path, retrained, images, 8)
  assert 'rebuilding' in caplog.text
  assert not np.array_equal(rebuilt['mean'], first['mean'])
  want = retrained.moments(retrained.params, images)[0]
  np.testing.assert_allclose(rebuilt['mean'][:, 0], want, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_gives_the_big_batch_update_with_dropout(dropout=0.3):
  """Stage 2's step, its U-Net with dropout: 4 micro-batches of 4 make the update of one
  batch of 16 (each example draws its own dropout masks, the same in either split; without
  dropout, tests/_layouts.py's LDM case and test_seam's ddpm case cover it)."""
  from ddpm import train as ddpm_train  # pylint: disable=g-import-not-at-top
  from latent.configs import ldm_base  # pylint: disable=g-import-not-at-top

  class Cached:  # The step reads cached posterior moments; only the scale factor is used.
    scale_factor = 0.5

  config = ldm_base.get_config()
  config.diffusion.num_timesteps = 100
  config.train.batch_size = 16
  model, batch = tiny_cached_ldm(dropout)
  schedule, tx = ddpm_train.build_schedule(config), ddpm_train.make_optimizer(config)
  state = train.init_state(config, model, tx)
  results = {}
  for k in (1, 4):
    config.train.grad_accum_steps = k
    step = jax.jit(lambda s, b: train.train_step(
        s, b, {}, config=config, model=model, schedule=schedule, tx=tx, stage1=Cached(),
        rules=ddpm_train.rules_of(config)))
    new, metrics = step(state, batch)
    results[k] = (float(metrics['loss']), jax.tree.leaves(new.params))
  np.testing.assert_allclose(results[4][0], results[1][0], rtol=1e-5)
  for a, b in zip(results[1][1], results[4][1]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
