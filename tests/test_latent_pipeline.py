"""A Stable Diffusion pipeline folder (diffusers' layout, tiny random weights) run by our
modules: the same latents and images as diffusers' own StableDiffusionPipeline."""

import jax
import numpy as np
import pytest
import torch

from common import errors
from latent.sd import config as sd_config, pipeline
from test_latent_clip import tiny_text_encoder, tiny_tokenizer


def build_tiny_pipeline(root, sd2: bool = False):
  """A tiny random StableDiffusionPipeline saved under root/sd: (folder, pipe).

  SD 1.x's settings, or with `sd2` 2.x's: GELU CLIP, linear proj_in, per-level head counts
  (the same head width), upcast attention, v-prediction.
  """
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  text_encoder = tiny_text_encoder(root / 'parts' / 'text_encoder', 'gelu' if sd2 else 'quick_gelu')
  tiny_tokenizer(root / 'parts' / 'tokenizer')
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / 'parts' / 'tokenizer'),
                                                         model_max_length=16)
  torch.manual_seed(1)
  levels = dict(down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), attention_head_dim=2)
  if sd2:
    levels = dict(down_block_types=('CrossAttnDownBlock2D',) * 2,
                  up_block_types=('CrossAttnUpBlock2D',) * 2, attention_head_dim=(2, 4),
                  upcast_attention=True)
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
      layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
      use_linear_projection=sd2, **levels)
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
      prediction_type='v_prediction' if sd2 else 'epsilon', timestep_spacing='leading')
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(root / 'sd')
  return root / 'sd', pipe


@pytest.fixture(scope='module')
def sd_folder(tmp_path_factory):
  return build_tiny_pipeline(tmp_path_factory.mktemp('sd'))


@pytest.mark.parametrize('sampler', ['ddim', 'unipc'])
def test_text_to_image_matches_diffusers(sd_folder, sampler):
  """The folder's DDIM scheduler, and UniPC made from its config (SD users' usual swap)."""
  import copy  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  folder, reference = sd_folder
  if sampler == 'unipc':
    reference = copy.copy(reference)
    reference.scheduler = diffusers.UniPCMultistepScheduler.from_config(reference.scheduler.config)
  ours = pipeline.load(folder)
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  prompts = ['red hair', 'hair']
  want = diffusers_images(reference, prompts, latents, 6, 3.0)
  got = pipeline.generate(ours, prompts, negative_prompt='red', guidance_scale=3.0,
                          latents=latents, sampler=sampler, num_steps=6)
  assert got.shape == want.shape == (2, 16, 16, 3)
  assert np.abs(got.astype(np.int32) - want).max() <= 1  # uint8 rounding.
  assert np.abs(got[0].astype(int) - got[1]).mean() > 1  # The prompts matter.


@pytest.mark.parametrize('sampler', ['ddim', 'heun'])
def test_sd2_style_text_to_image_matches_diffusers(tmp_path, sampler):
  """v-prediction, linear projections, GELU CLIP, per-level head counts, upcast attention."""
  import diffusers  # pylint: disable=g-import-not-at-top
  folder, reference = build_tiny_pipeline(tmp_path, sd2=True)
  if sampler == 'heun':
    reference.scheduler = diffusers.HeunDiscreteScheduler.from_config(reference.scheduler.config)
  ours = pipeline.load(folder)
  assert ours.sampler_options['prediction'] == 'v' and ours.unet.linear_projection
  latents = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
  prompts = ['red hair', 'hair']
  want = diffusers_images(reference, prompts, latents, 5, 7.5)
  got = pipeline.generate(ours, prompts, negative_prompt='red', guidance_scale=7.5,
                          latents=latents, sampler=sampler, num_steps=5)
  assert np.abs(got.astype(np.int32) - want).max() <= 1


def test_bfloat16_is_as_close_to_float32_as_diffusers_bfloat16(sd_folder):
  """dtype=bfloat16 stores and runs every part in bfloat16 (half the memory); its images
  stay as close to float32's as diffusers' own pipeline in torch.bfloat16 does to its."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  folder, reference = sd_folder
  half = pipeline.load(folder, jnp.bfloat16)
  assert {p.dtype for p in jax.tree.leaves((half.unet_params, half.vae_params,
                                            half.text_params))} == {jnp.dtype(jnp.bfloat16)}
  latents = np.random.default_rng(5).standard_normal((2, 8, 8, 4)).astype(np.float32)
  prompts, kw = ['red hair', 'hair'], dict(negative_prompt='red', guidance_scale=7.5,
                                           latents=latents, sampler='dpm_solver', num_steps=8)
  ours_error = np.abs(pipeline.generate(half, prompts, **kw).astype(int)
                      - pipeline.generate(pipeline.load(folder), prompts, **kw)).mean()
  import diffusers  # pylint: disable=g-import-not-at-top
  import copy  # pylint: disable=g-import-not-at-top
  theirs = diffusers.StableDiffusionPipeline(**copy.deepcopy(reference.components))
  theirs.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)
  theirs_float32 = diffusers_images(theirs, prompts, latents, 8, 7.5)
  theirs_error = np.abs(diffusers_images(theirs.to(torch.bfloat16), prompts, latents, 8, 7.5)
                        - theirs_float32).mean()
  print(f'mean |bfloat16 - float32| in uint8 levels: ours {ours_error:.2f}, diffusers '
        f'{theirs_error:.2f}')
  assert 0 < ours_error <= 1.5 * theirs_error + 0.5, (ours_error, theirs_error)


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
  bad = subprocess.run(command + ['--config.sample.init_image=/nowhere.png'], cwd=repo,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "sample.init_image='/nowhere.png' does not exist" in bad.stderr
  assert 'loading the pipeline' not in bad.stderr  # Found before any weights are read.
  # Inpainting the first picture with a sigma sampler, from the command line.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  mask = np.zeros((16, 16), np.uint8)
  mask[:, 8:] = 255  # White = generate the right half.
  Image.fromarray(mask).save(tmp_path / 'mask.png')
  picture = tmp_path / 'samples' / '1.jpg'
  proc = subprocess.run(command[:6] + [
      f'--config.pipeline={folder}', "--config.sample.prompts=('hair',)",
      f'--config.sample.init_image={picture}', f'--config.sample.mask={tmp_path / "mask.png"}',
      '--config.sample.num_per_prompt=1', '--config.sample.num_steps=4',
      '--config.sample.sampler=euler', f'--config.sample.output_dir={tmp_path / "inpainted"}'],
      cwd=repo, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # (What inpainting computes is test_inpainting_matches_diffusers' business.)
  assert np.asarray(Image.open(tmp_path / 'inpainted' / '1.jpg')).shape == (16, 16, 3)


def test_our_unet_and_vae_open_in_diffusers(tmp_path):
  """Ours out: a ConditionalUNet and an autoencoder saved as diffusers folders, opened with
  from_pretrained, give our outputs (and read back with unet_from_config, the same model)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from latent.ldm import unet as unet_lib
  from latent.vae import autoencoder  # pylint: disable=g-import-not-at-top
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
  assert sd_config.unet_from_config(json.loads((tmp_path / 'unet' / 'config.json').read_text())) == unet

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


def diffusers_images(pipe, prompts, latents, steps, guidance_scale, negative_prompt='red'):
  """int32 images [B, H, W, 3] of a diffusers text-to-image pipeline from NHWC `latents`."""
  with torch.no_grad():
    images = pipe(prompts, negative_prompt=[negative_prompt] * len(prompts),
                  num_inference_steps=steps, guidance_scale=guidance_scale,
                  latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)).to(pipe.dtype),
                  output_type='np').images
  return _images(images.astype(np.float32))


def _noise_and_picture(seed, shape=(2, 4, 8, 8)):
  """diffusers' pipelines draw their noise with torch.randn(generator); the same noise for
  ours, and picture latents given to both (diffusers would sample the VAE posterior)."""
  noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
  picture = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
  nhwc = lambda a: a.numpy().transpose(0, 2, 3, 1)
  return noise, picture, nhwc(noise), nhwc(picture)


def _images(want):
  return np.round(want * 255).astype(np.int32)  # diffusers' numpy output in [0, 1].


def test_image_to_image_matches_diffusers(sd_folder):
  import diffusers  # pylint: disable=g-import-not-at-top
  folder, reference = sd_folder
  ours = pipeline.load(folder)
  img2img = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
  img2img.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
  _, picture, noise, init_z0 = _noise_and_picture(3)
  prompts = ['red hair', 'hair']
  with torch.no_grad():
    want = img2img(prompts, image=picture, strength=0.6, num_inference_steps=8,
                   guidance_scale=3.0, negative_prompt=['red'] * 2, output_type='np',
                   generator=torch.Generator().manual_seed(3)).images
  got = pipeline.generate(ours, prompts, negative_prompt='red', guidance_scale=3.0,
                          latents=noise, init_z0=init_z0, sampler='euler', num_steps=8,
                          strength=0.6)
  assert np.abs(got.astype(np.int32) - _images(want)).max() <= 1
  text_to_image = pipeline.generate(ours, prompts, negative_prompt='red', guidance_scale=3.0,
                                    latents=noise, sampler='euler', num_steps=8)
  assert np.abs(got.astype(int) - text_to_image).mean() > 1  # The picture matters.


@pytest.mark.parametrize('unet_channels', [4, 9])
def test_inpainting_matches_diffusers(sd_folder, tmp_path, unet_channels):
  """diffusers' StableDiffusionInpaintPipeline: with SD's own U-Net (4 channels: the kept
  region re-imposed every step) and with an inpainting U-Net (9: mask and masked picture
  as inputs)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  folder, reference = sd_folder
  components = dict(reference.components)
  if unet_channels == 9:  # An SD-inpainting-style U-Net, saved as its own pipeline folder.
    torch.manual_seed(2)
    unet = diffusers.UNet2DConditionModel(**{**reference.unet.config, 'in_channels': 9})
    with torch.no_grad():
      for p in unet.parameters():
        p.add_(0.05 * torch.randn_like(p))
    components['unet'] = unet
    diffusers.StableDiffusionPipeline(**components).save_pretrained(tmp_path / 'inpaint')
    folder = tmp_path / 'inpaint'
  inpaint = diffusers.StableDiffusionInpaintPipeline(**components)
  inpaint.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
      reference.scheduler.config, use_karras_sigmas=True)
  ours = pipeline.load(folder)
  _, picture, noise, init_z0 = _noise_and_picture(4)
  keep = np.ones((2, 8, 8, 1), np.float32)
  keep[:, 2:6, 1:5] = 0  # Repaint a square of the latent grid ...
  mask = torch.from_numpy(1 - keep.repeat(2, 1).repeat(2, 2).transpose(0, 3, 1, 2))  # ... 16x16.
  masked = init_z0 * keep  # Stands for the masked picture's latents, given to both.
  prompts = ['red hair', 'hair']
  with torch.no_grad():
    want = inpaint(prompts, image=picture, mask_image=mask,
                   masked_image_latents=torch.from_numpy(masked.transpose(0, 3, 1, 2)),
                   num_inference_steps=8, guidance_scale=3.0, negative_prompt=['red'] * 2,
                   output_type='np', generator=torch.Generator().manual_seed(4)).images
  got = pipeline.generate(ours, prompts, negative_prompt='red', guidance_scale=3.0,
                          latents=noise, init_z0=init_z0, keep=keep, masked_z0=masked,
                          sampler='dpmpp_2m_karras', num_steps=8)
  assert np.abs(got.astype(np.int32) - _images(want)).max() <= 1


def _edit_json(path, **changes):
  import json  # pylint: disable=g-import-not-at-top
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize('damage,error,message', [
    ('no_vae', errors.MissingFileError, r'vae/config\.json not found'),
    ('sdxl_unet', errors.ConfigError, r"addition_embed_type': 'text_time'"),
    ('wider_unet', errors.ConfigError, r'unet: .*shape .* does not fit'),
    ('pickles', errors.MissingFileError, r'only PyTorch pickle weights \(diffusion_pytorch_model'
                                         r'\.bin\)'),
    ('ckpt', errors.ConfigError, r'v1-5-pruned\.ckpt is a single-file checkpoint.*from_single_file'),
    ('component', errors.MissingFileError, r'unet/model_index\.json not found'),
    ('truncated', errors.DataError, r'unet/diffusion_pytorch_model\.safetensors cannot be read'),
    ('vae_variant', errors.ConfigError, r'vae/config\.json describes an AutoencoderKL variant'),
])
def test_bad_pipeline_folders_are_named(sd_folder, tmp_path, damage, error, message):
  import shutil  # pylint: disable=g-import-not-at-top
  folder = tmp_path / 'sd'
  shutil.copytree(sd_folder[0], folder)
  if damage == 'no_vae':
    shutil.rmtree(folder / 'vae')
  elif damage == 'sdxl_unet':
    _edit_json(folder / 'unet' / 'config.json', addition_embed_type='text_time')
  elif damage == 'wider_unet':
    _edit_json(folder / 'unet' / 'config.json', block_out_channels=[16, 48])
  elif damage == 'component':
    folder = folder / 'unet'  # One part, not the pipeline.
  elif damage == 'truncated':
    weights = folder / 'unet' / 'diffusion_pytorch_model.safetensors'
    weights.write_bytes(weights.read_bytes()[:1000])
  elif damage == 'vae_variant':  # Found before any weights are read.
    _edit_json(folder / 'vae' / 'config.json', use_quant_conv=False)
    (folder / 'unet' / 'diffusion_pytorch_model.safetensors').unlink()
  elif damage == 'pickles':
    weights = folder / 'unet' / 'diffusion_pytorch_model.safetensors'
    weights.rename(weights.with_suffix('.bin'))
  else:
    folder = tmp_path / 'original'
    folder.mkdir()
    (folder / 'v1-5-pruned.ckpt').write_bytes(b'')
  with pytest.raises(error, match=message):
    pipeline.load(folder)


def test_half_precision_only_folder_loads_upcast(sd_folder, tmp_path):
  """A folder saved with variant='fp16' (weights as <name>.fp16.safetensors only) loads in
  float32 and draws what the float32 folder draws, to fp16's rounding."""
  import shutil  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  folder = tmp_path / 'sd'
  shutil.copytree(sd_folder[0], folder)
  for weights in folder.glob('*/*.safetensors'):
    save_file({k: v.astype(np.float16) for k, v in load_file(str(weights)).items()},
              str(weights.with_suffix('.fp16.safetensors')))
    weights.unlink()
  half = pipeline.load(folder)
  assert {p.dtype for p in jax.tree.leaves(half.unet_params)} == {np.dtype('float32')}
  kw = dict(prompts=['red hair'], negative_prompt='red', guidance_scale=3.0, sampler='ddim',
            num_steps=4)
  got = pipeline.generate(half, **kw).astype(int)
  want = pipeline.generate(pipeline.load(sd_folder[0]), **kw).astype(int)
  assert np.abs(got - want).max() <= 2


def test_saved_pipeline_opens_in_diffusers_with_the_same_images(sd_folder, tmp_path):
  """Ours out: a loaded pipeline written back (unet/, vae/, text_encoder/, tokenizer/,
  scheduler/, model_index.json) opens with StableDiffusionPipeline.from_pretrained and draws
  the original's images; an existing folder is never written over."""
  import diffusers  # pylint: disable=g-import-not-at-top
  folder, reference = sd_folder
  ours = pipeline.load(folder)
  saved = pipeline.save(ours, tmp_path / 'saved')
  latents = np.random.default_rng(7).standard_normal((2, 8, 8, 4)).astype(np.float32)
  prompts = ['red hair', 'hair']
  reopened = diffusers.StableDiffusionPipeline.from_pretrained(saved)
  np.testing.assert_array_equal(diffusers_images(reopened, prompts, latents, 4, 7.5),
                                diffusers_images(reference, prompts, latents, 4, 7.5))
  kw = dict(negative_prompt='red', guidance_scale=7.5, latents=latents, sampler='ddim',
            num_steps=4)
  np.testing.assert_array_equal(pipeline.generate(pipeline.load(saved), prompts, **kw),
                                pipeline.generate(ours, prompts, **kw))
  with pytest.raises(errors.WorkdirError, match='exists'):
    pipeline.save(ours, saved)


@pytest.mark.parametrize('mask_side', [64, 50, 96])
def test_inpainting_mask_on_the_latent_grid_is_diffusers(tmp_path, mask_side):
  """sample.mask -> the latent keep mask, against diffusers' own mask preparation
  (VaeImageProcessor's resize, grayscale and binarisation, then prepare_mask_latents'
  interpolation) on thin strokes and half-covered cells, at the image's size and others."""
  import diffusers  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from latent.ldm import sample  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(mask_side)
  mask = np.zeros((64, 64), np.uint8)
  mask[10, :] = 255                      # A one-pixel stroke.
  mask[:, 37:39] = 255                   # Two pixels wide, inside one cell column.
  mask[40:44, 0:32] = 255                # Half of each cell's rows.
  mask[48:56, 44:48] = 180               # Half of each cell's columns, a grey above 0.5.
  mask[56:64, 0:8] = 100                 # A grey below 0.5: kept.
  mask |= (rng.random((64, 64)) < 0.05).astype(np.uint8) * 255  # Scattered white pixels.
  img = Image.fromarray(mask).convert('RGB').resize((mask_side, mask_side),
                                                    Image.Resampling.NEAREST)
  img.save(tmp_path / 'mask.png')
  processor = diffusers.image_processor.VaeImageProcessor(
      vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
  theirs = processor.preprocess(Image.open(tmp_path / 'mask.png'), height=64, width=64)
  theirs = torch.nn.functional.interpolate(theirs, size=(8, 8))[0, 0].numpy()
  keep = sample.read_mask(tmp_path / 'mask.png', 64, 8)[0, :, :, 0]
  np.testing.assert_array_equal(keep, 1.0 - theirs)
  assert 0 < keep.sum() < keep.size  # Both kinds of cell are there.
