"""A Stable Diffusion pipeline folder (diffusers' layout, tiny random weights) run by our
modules: the same latents and images as diffusers' own StableDiffusionPipeline."""

import numpy as np
import pytest
import torch

from common import errors
from latent import pipeline
from test_latent_clip import tiny_text_encoder, tiny_tokenizer


def build_tiny_pipeline(root):
  """A tiny random StableDiffusionPipeline (SD 1.x settings) saved under root/sd: (folder, pipe)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  text_encoder = tiny_text_encoder(root / 'parts' / 'text_encoder', 'quick_gelu')
  tiny_tokenizer(root / 'parts' / 'tokenizer')
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / 'parts' / 'tokenizer'),
                                                         model_max_length=16)
  torch.manual_seed(1)
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
      layers_per_block=1, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), norm_num_groups=8,
      cross_attention_dim=32, attention_head_dim=2, use_linear_projection=False)
  vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                                norm_num_groups=8,
                                down_block_types=('DownEncoderBlock2D',) * 2,
                                up_block_types=('UpDecoderBlock2D',) * 2)
  with torch.no_grad():
    for model in (unet, vae):
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
  scheduler = diffusers.DDIMScheduler(  # Stable Diffusion 1.x's scheduler settings.
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      beta_schedule='scaled_linear', clip_sample=False, set_alpha_to_one=False, steps_offset=1,
      prediction_type='epsilon', timestep_spacing='leading')
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(root / 'sd')
  return root / 'sd', pipe


@pytest.fixture(scope='module')
def sd_folder(tmp_path_factory):
  return build_tiny_pipeline(tmp_path_factory.mktemp('sd'))


def test_text_to_image_matches_diffusers(sd_folder):
  folder, reference = sd_folder
  ours = pipeline.load(folder)
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  prompts = ['red hair', 'hair']
  with torch.no_grad():
    want = reference(prompts, negative_prompt=['red', 'red'], num_inference_steps=6,
                     guidance_scale=3.0, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                     output_type='np').images
  got = pipeline.generate(ours, prompts, negative_prompt='red', guidance_scale=3.0,
                          latents=latents, sampler='ddim', num_steps=6)
  want = np.round(want * 255).astype(np.int32)  # diffusers' numpy output in [0, 1].
  assert got.shape == want.shape == (2, 16, 16, 3)
  assert np.abs(got.astype(np.int32) - want).max() <= 1  # uint8 rounding.
  assert np.abs(got[0].astype(int) - got[1]).mean() > 1  # The prompts matter.


def test_scheduler_settings_are_read(sd_folder):
  folder, _ = sd_folder
  ours = pipeline.load(folder)
  assert ours.sampler_options['steps_offset'] == 1 and ours.sampler_options['spacing'] == 'leading'
  assert ours.sampler_options['final_alpha_cumprod'] == pytest.approx(1 - 0.00085, rel=1e-6)
  assert ours.scaling_factor == pytest.approx(0.18215)
  assert ours.unet.num_heads == 2 and not ours.unet.linear_projection


def test_not_a_pipeline_folder_is_named(tmp_path):
  with pytest.raises(errors.MissingFileError, match='model_index.json not found'):
    pipeline.load(tmp_path)


def test_sample_command_writes_numbered_images(sd_folder, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  folder, _ = sd_folder
  repo = Path(__file__).resolve().parents[1]
  command = [sys.executable, '-m', 'latent.main', '--config=latent/configs/sd_pipeline.py',
             f'--workdir={tmp_path}', '--mode=sample', f'--config.pipeline={folder}',
             "--config.sample.prompts=('red hair', 'hair')", '--config.sample.num_per_prompt=2',
             '--config.sample.num_steps=4', '--config.sample.negative_prompt=red']
  proc = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(p.name for p in (tmp_path / 'samples').iterdir()) == [
      '1.jpg', '2.jpg', '3.jpg', '4.jpg', 'captions.tsv']
  assert (tmp_path / 'samples_grid.png').is_file()
  bad = subprocess.run(command[:6] + ['--config.pipeline=/nowhere'], cwd=repo,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and 'error: /nowhere/model_index.json not found' in bad.stderr


def test_our_unet_and_vae_open_in_diffusers(tmp_path):
  """Ours out: a ConditionalUNet and an autoencoder saved as diffusers folders, opened with
  from_pretrained, give our outputs (and read back with unet_from_config, the same model)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from latent import autoencoder, unet as unet_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  randomise = lambda tree: jax.tree.map(
      lambda p: jnp.asarray(rng.normal(0, 0.05, p.shape), jnp.float32), tree)
  unet = unet_lib.ConditionalUNet(sample_size=8, in_channels=4, out_channels=4,
                                  block_out_channels=(16, 32), layers_per_block=1,
                                  attention_resolutions=(8, 4), head_dim=8, norm_groups=8,
                                  transformer_depth=1)
  z = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  t, context = np.array([3, 500]), rng.normal(size=(2, 5, 12)).astype(np.float32)
  params = randomise(unet.init(jax.random.PRNGKey(0), z, t, context=context)['params'])
  pipeline.save_unet(tmp_path / 'unet', unet, params, cross_attention_dim=12)
  theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / 'unet').eval()
  with torch.no_grad():
    want = theirs(torch.from_numpy(z.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                  encoder_hidden_states=torch.from_numpy(context)).sample.numpy()
  got = np.asarray(unet.apply({'params': params}, z, t, context=context)).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
  import json  # pylint: disable=g-import-not-at-top
  assert pipeline.unet_from_config(json.loads((tmp_path / 'unet' / 'config.json').read_text())) == unet

  vae = autoencoder.AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1,
                                  latent_channels=4, norm_groups=8)
  vae_params = randomise(autoencoder.init_params(vae, jax.random.PRNGKey(1), 16))
  pipeline.save_vae(tmp_path / 'vae', vae, vae_params, scaling_factor=0.5)
  loaded, loaded_params, scale = autoencoder.load_diffusers_vae(tmp_path / 'vae')
  assert scale == 0.5
  theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / 'vae').eval()
  latents = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    want = theirs.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample.numpy()
  got = np.asarray(vae.apply({'params': vae_params}, latents, method=vae.decode))
  np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, atol=1e-4 * np.abs(want).max())
  again = np.asarray(loaded.apply({'params': loaded_params}, latents, method=loaded.decode))
  np.testing.assert_array_equal(again, got)
