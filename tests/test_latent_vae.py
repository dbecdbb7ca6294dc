"""Stage 1 of latent diffusion: the KL autoencoder against diffusers, its losses, training and loading."""

import os
import signal

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from common import checkpoint, data, loop, mesh as mesh_lib
from common.logs import read_scalars
from ddpm import convert
from latent.vae import autoencoder, codec, loss as vae_loss, state as vae_state
from latent.vae import train as vae_train
from latent.configs import vae_base

PARITY = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_groups=8)
DISC_START = 40


def tiny_config():
  config = vae_base.get_config()
  config.data.source = 'digits'
  config.data.path = ''
  config.data.image_size = 16
  config.vae.block_out_channels = (8, 16)
  config.vae.layers_per_block = 1
  config.vae.latent_channels = 4
  config.vae.norm_groups = 4
  config.loss.disc_start = DISC_START
  config.loss.disc_channels = 8
  config.loss.disc_layers = 2
  config.optim.learning_rate = 2e-3
  config.disc_optim.learning_rate = 2e-3
  config.train.batch_size = 16
  config.train.num_steps = 120
  config.train.log_every = 20
  config.train.checkpoint_every = 20
  config.train.keep_checkpoints = 20
  config.train.async_checkpoint = False
  config.train.eval_every = 60
  config.train.num_eval_images = 16
  config.train.scale_factor_images = 256
  return config


def restore(workdir, config, step):
  model, disc = vae_state.build_model(config), vae_state.build_discriminator(config)
  target = jax.eval_shape(lambda: vae_state.init_state(config, model, disc,
                                                       *vae_state.make_optimizers(config)))
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    return ckpt.restore(target, step)
  finally:
    ckpt.close()


def leaves_equal(a, b):
  la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


# --- The autoencoder against diffusers -------------------------------------------------------

@pytest.fixture(scope='module')
def pair():
  """A random diffusers AutoencoderKL and ours holding the same weights."""
  model = autoencoder.AutoencoderKL(**PARITY)
  torch.manual_seed(0)
  reference = TorchAutoencoderKL(**autoencoder.diffusers_config(model), sample_size=16).eval()
  with torch.no_grad():  # Random (not default-initialised) weights, so every block matters.
    for p in reference.parameters():
      p.normal_(0, 0.05)
  shapes = jax.eval_shape(lambda: autoencoder.init_params(model, jax.random.PRNGKey(0), 16))
  params = convert.params_from_torch_state_dict(
      {k: v.numpy() for k, v in reference.state_dict().items()}, shapes)
  encode = jax.jit(lambda p, x: model.apply({'params': p}, x, method=model.encode))
  decode = jax.jit(lambda p, z: model.apply({'params': p}, z, method=model.decode))
  return model, reference, params, encode, decode


def nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


def test_module_names_and_parameter_count_match_diffusers(pair):
  _, reference, params, _, _ = pair
  assert sum(x.size for x in jax.tree.leaves(params)) == sum(
      p.numel() for p in reference.parameters())
  names = {'.'.join(path[:-1]) for path in flax.traverse_util.flatten_dict(params)}
  for name in ('encoder.down_blocks_0.resnets_0.conv1', 'encoder.mid_block.attentions_0.to_q',
               'decoder.up_blocks_0.upsamplers_0.conv', 'encoder.down_blocks_0.downsamplers_0.conv',
               'quant_conv', 'post_quant_conv', 'decoder.conv_out'):
    assert name in names, name


def test_encoder_and_decoder_match_diffusers(pair):
  _, reference, params, encode, decode = pair
  x = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
  z = np.random.RandomState(1).randn(2, 8, 8, 4).astype(np.float32)
  mean, logvar = encode(params, x)
  recon = np.asarray(decode(params, z))
  with torch.no_grad():
    posterior = reference.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    theirs = nhwc(reference.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample)
  for ours, ref in ((mean, nhwc(posterior.mean)), (logvar, nhwc(posterior.logvar)),
                    (recon, theirs)):
    ours = np.asarray(ours)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max())


def test_load_diffusers_folder(pair, tmp_path):
  model, reference, params, _, _ = pair
  reference.save_pretrained(tmp_path)
  loaded_model, loaded, scaling = autoencoder.load_diffusers_vae(tmp_path)
  assert loaded_model == model and scaling == pytest.approx(reference.config.scaling_factor)
  assert leaves_equal(loaded, params)
  # Older checkpoints (the original SD VAEs) name the attention layers query/key/value/proj_attn.
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  old_names = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  old = {}
  for key, value in load_file(str(tmp_path / 'diffusion_pytorch_model.safetensors')).items():
    for new_name, old_name in old_names.items():
      key = key.replace(f'attentions.0.{new_name}.', f'attentions.0.{old_name}.')
    old[key] = value
  assert 'encoder.mid_block.attentions.0.proj_attn.weight' in old
  (tmp_path / 'old').mkdir()
  (tmp_path / 'old' / 'config.json').write_text((tmp_path / 'config.json').read_text())
  save_file(old, str(tmp_path / 'old' / 'diffusion_pytorch_model.safetensors'))
  assert leaves_equal(autoencoder.load_diffusers_vae(tmp_path / 'old')[1], params)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'nothing')):
    autoencoder.load_diffusers_vae(tmp_path / 'nothing')


# --- Losses ----------------------------------------------------------------------------------

def test_kl_matches_float64_closed_form():
  rs = np.random.RandomState(0)
  mean, logvar = rs.randn(3, 4, 4, 2), rs.randn(3, 4, 4, 2) * 2
  expected = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
  ours = autoencoder.kl(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5)
  assert float(vae_loss.kl_loss(mean.astype(np.float32), logvar.astype(np.float32))) == \
      pytest.approx(expected.mean(), rel=1e-5)
  # The posterior's logvar is clipped like diffusers'; its mode is its mean.
  m, lv = autoencoder.split_moments(jnp.concatenate([jnp.zeros((1, 2, 2, 2)),
                                                     jnp.full((1, 2, 2, 2), -100.0)], -1))
  assert float(lv.min()) == -30.0 and float(jnp.abs(autoencoder.mode(m, lv)).max()) == 0.0


def test_reconstruction_and_hinge_losses():
  rs = np.random.RandomState(0)
  x, r = rs.randn(2, 4, 4, 3).astype(np.float32), rs.randn(2, 4, 4, 3).astype(np.float32)
  l1, l2 = np.abs(x - r).sum() / 2, ((x - r)**2).sum() / 2
  for kind, want in (('l1', l1), ('l2', l2), ('l1+l2', l1 + l2)):
    assert float(vae_loss.reconstruction_loss(x, r, kind)) == pytest.approx(want, rel=1e-5)
  real, fake = np.array([2.0, 0.5, -1.0]), np.array([-2.0, 0.0, 3.0])
  want_d = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
  assert float(vae_loss.hinge_d_loss(real, fake)) == pytest.approx(want_d)
  assert float(vae_loss.hinge_g_loss(fake)) == pytest.approx(-np.mean(fake))


def test_adaptive_weight_equals_full_network_gradient_ratio():
  config = tiny_config()
  model, disc = vae_state.build_model(config), vae_state.build_discriminator(config)
  state = vae_state.create_train_state(config, model, disc, *vae_state.make_optimizers(config),
                                       mesh_lib.make_mesh())  # Compiled once for all tests.
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  rng = jax.random.PRNGKey(3)
  assert jax.eval_shape(disc.init, rng, x)['params']
  assert disc.apply({'params': state.disc_params}, x).shape == (4, 2, 2, 1)
  assert vae_loss.discriminator_output_size(16, 2) == 2

  @jax.jit
  def both(params, disc_params):
    def losses(p):
      recon = model.apply({'params': p}, x, rng)[0]
      return jnp.stack([vae_loss.reconstruction_loss(x, recon, 'l1'),
                        vae_loss.hinge_g_loss(disc.apply({'params': disc_params}, recon))])
    # Plain jax.grad over the whole network, for each loss separately.
    full = jax.jacrev(losses)(params)['decoder']['conv_out']['kernel']
    # The cheap path: d loss / d recon, pushed through conv_out alone.
    (recon, _, _), inter = model.apply({'params': params}, x, rng, mutable=['intermediates'])
    h = inter['intermediates']['decoder']['conv_out_input'][0]
    g_rec = jax.grad(lambda r: vae_loss.reconstruction_loss(x, r, 'l1'))(recon)
    g_gan = jax.grad(lambda r: vae_loss.hinge_g_loss(disc.apply({'params': disc_params}, r)))(recon)
    conv_out = params['decoder']['conv_out']
    cheap = [vae_loss.last_layer_grad(model, conv_out, h, g) for g in (g_rec, g_gan)]
    return full, cheap, vae_loss.adaptive_weight(*cheap, 0.5)

  full, cheap, weight = both(state.params, state.disc_params)
  # float32 sums in two orders (jacrev through the whole network against the VJP of conv_out
  # alone): on a 2-core AMD EPYC one element of 216 differed by 2.3e-4 relative
  # (-8.5273e-4 vs -8.5253e-4); a wrong formula would be off by far more.
  for i in range(2):
    np.testing.assert_allclose(cheap[i], full[i], rtol=5e-4, atol=1e-6 * np.abs(full[i]).max())
  expected = 0.5 * np.linalg.norm(full[0]) / (np.linalg.norm(full[1]) + 1e-4)
  assert float(weight) == pytest.approx(expected, rel=1e-4)
  # Clipped to [0, 1e4] (times disc_weight) when the GAN gradient vanishes.
  assert float(vae_loss.adaptive_weight(cheap[0], 0 * cheap[1], 2.0)) == pytest.approx(2e4)


# --- Training --------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  config = tiny_config()
  workdir = tmp_path_factory.mktemp('vae')
  state = vae_train.train_and_evaluate(config, str(workdir))
  return config, workdir, state


def test_reconstruction_error_falls(trained):
  config, workdir, state = trained
  assert int(state.step) == config.train.num_steps
  l1 = [v for _, v in read_scalars(workdir, 'l1')]
  assert len(l1) == 6 and all(np.isfinite(l1))
  assert np.mean(l1[-2:]) < 0.5 * l1[0], l1
  psnr = read_scalars(workdir, 'eval_psnr')
  assert [s for s, _ in psnr] == [60, 120] and psnr[-1][1] > 15, psnr
  assert (workdir / 'reconstructions' / '00000120.png').exists()


def test_discriminator_off_before_disc_start_and_on_after(trained):
  config, workdir, _ = trained
  model, disc = vae_state.build_model(config), vae_state.build_discriminator(config)
  mesh = mesh_lib.make_mesh()
  init = vae_state.create_train_state(config, model, disc, *vae_state.make_optimizers(config), mesh)
  before, after = restore(workdir, config, DISC_START), restore(workdir, config, DISC_START + 20)
  assert leaves_equal(before.disc_params, init.disc_params)
  assert leaves_equal(before.disc_opt_state, init.disc_opt_state)
  assert not leaves_equal(after.disc_params, init.disc_params)
  logged = {tag: dict(read_scalars(workdir, tag)) for tag in ('disc_loss', 'g_loss', 'gan_weight')}
  for tag, values in logged.items():
    assert values[DISC_START] == 0.0, tag           # Steps 21-40: the GAN terms are exactly 0.
  assert logged['disc_loss'][DISC_START + 20] > 0 and logged['gan_weight'][DISC_START + 20] > 0


def test_resumed_run_matches_uninterrupted_run_and_stores_scale_factor(trained, tmp_path,
                                                                       monkeypatch):
  config, full_dir, _ = trained
  config = config.copy_and_resolve_references()
  config.train.num_steps = 60                        # Constant LR: the first 60 steps of `trained`.
  stop_at = 30
  run = loop.run

  def preempted_run(*args, hooks=(), **kwargs):  # SIGTERM during step 30's hooks: saves at 31.
    kill = lambda step, state: step == stop_at and os.kill(os.getpid(), signal.SIGTERM)
    return run(*args, hooks=[*hooks, loop.Hook(stop_at, kill)], **kwargs)

  monkeypatch.setattr(loop, 'run', preempted_run)
  workdir = tmp_path / 'split'
  stopped = vae_train.train_and_evaluate(config, str(workdir))
  assert int(stopped.step) == stop_at + 1 and float(stopped.scale_factor) == 0.0
  with pytest.raises(ValueError, match='no latent scale factor'):
    codec.load_vae(workdir)
  monkeypatch.setattr(loop, 'run', run)

  resumed = vae_train.train_and_evaluate(config, str(workdir))
  uninterrupted = restore(full_dir, config, 60)
  assert int(resumed.step) == 60
  for field in ('params', 'disc_params', 'opt_state', 'disc_opt_state'):
    assert leaves_equal(getattr(resumed, field), getattr(uninterrupted, field)), field
  scale = float(resumed.scale_factor)
  assert scale > 0

  # The scale factor is in the final checkpoint; load_vae restores it with the parameters.
  model, params, loaded_scale, loaded_config = codec.load_vae(workdir)
  assert loaded_scale == scale and loaded_config.train.num_steps == 60
  assert leaves_equal(params, resumed.params)
  # An already-finished run keeps it without training again.
  again = vae_train.train_and_evaluate(config, str(workdir))
  assert int(again.step) == 60 and float(again.scale_factor) == scale

  # It is 1 / std of the posterior means of the first scale_factor_images training images.
  images = data.load_dataset(config.data)[:config.train.scale_factor_images]
  latents = codec.encode_images(model, params, scale, images, batch_size=64)
  assert latents.shape == (len(images), 8, 8, 4)
  assert np.std(latents.astype(np.float64)) == pytest.approx(1.0, rel=1e-5)
  sampled = codec.encode_images(model, params, scale, images[:8], 8, sample_posterior=True,
                                    rng=jax.random.PRNGKey(0))
  assert not np.array_equal(sampled, latents[:8])
  recon = codec.decode_images(model, params, scale, latents[:8], batch_size=8)
  assert recon.dtype == np.uint8 and recon.shape == (8, 16, 16, 3)
  assert vae_train.psnr(images[:8], recon) > 12


# --- Errors ----------------------------------------------------------------------------------

def test_load_vae_names_a_missing_or_empty_workdir(tmp_path):
  no_checkpoint = tmp_path / 'no_checkpoint'  # A run that stopped before its first save.
  loop.record_config(tiny_config(), no_checkpoint)
  for workdir in (tmp_path / 'missing', tmp_path, no_checkpoint):
    with pytest.raises(FileNotFoundError, match=f'{workdir}.*train stage 1 first'):
      codec.load_vae(workdir)


@pytest.mark.parametrize('key,value,error,message', [
    ('train.num_stepz', 5, KeyError, 'train.num_stepz'),
    ('loss.rec_loss', 'l3', ValueError, "loss.rec_loss='l3'"),
    ('loss.lpips_weight', 0.1, ValueError, 'loss.lpips_weight=0.1 needs loss.lpips_weights'),
    ('data.image_size', 15, ValueError, 'data.image_size=15 must be divisible'),
    ('vae.norm_groups', 3, ValueError, 'vae.norm_groups=3'),
    ('loss.disc_layers', 4, ValueError, 'loss.disc_layers=4'),
])
def test_bad_config_is_rejected_before_compute(tmp_path, key, value, error, message):
  config = tiny_config()
  section, name = key.split('.')
  with config.unlocked():
    config[section][name] = value
  with pytest.raises(error, match=message):
    vae_train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize('name', ['vae_demo', 'vae_anime'])
def test_shipped_configs_validate(name):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'latent.configs.{name}').get_config()
  vae_base.validate(config)
  assert vae_state.build_model(config).downsampling_factor == 4
