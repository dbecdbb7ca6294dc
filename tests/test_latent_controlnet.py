"""ControlNet (latent/controlnet/): parity with diffusers' ControlNetModel, the zero-convolution
start, its folder in and out, control maps and the edge-agreement score.

The end-to-end training run on a tiny text LDM is in tests/test_latent_finetune.py, beside
the other methods that share its base.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

from common import errors
from ddpm import convert
from latent.controlnet import maps, model as controlnet
from latent.ldm import unet
from test_latent_conditioning import _diffusers_pair
from test_latent_pipeline import sd_folder  # noqa: F401  (a fixture)

EMBEDDING = (8, 16)  # One stride-2 stage: 16x16 control images for 8x8 latents.


def _pair():
  """Our ConditionalUNet, diffusers' UNet2DConditionModel of the same shape, and its
  ControlNetModel.from_unet with random weights everywhere."""
  import torch  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  ours, theirs = _diffusers_pair()
  theirs_cn = diffusers.ControlNetModel.from_unet(
      theirs, conditioning_embedding_out_channels=EMBEDDING)
  with torch.no_grad():  # The zero convolutions too, so every residual is non-trivial.
    for p in theirs_cn.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return ours, theirs, theirs_cn.eval()


def _inputs(seed=1):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(2, 8, 8, 4)).astype(np.float32), np.array([3, 777]),
          rng.uniform(size=(2, 16, 16, 3)).astype(np.float32),
          rng.normal(size=(2, 5, 12)).astype(np.float32))


def _torch_residuals(model, z, t, control, context, scale, guess_mode):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    down, mid = model(torch.from_numpy(z.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                      encoder_hidden_states=torch.from_numpy(context),
                      controlnet_cond=torch.from_numpy(control.transpose(0, 3, 1, 2)),
                      conditioning_scale=scale, guess_mode=guess_mode, return_dict=False)
  nhwc = lambda a: a.numpy().transpose(0, 2, 3, 1)
  return [nhwc(d) for d in down], nhwc(mid)


def _close(ours, theirs):
  down, mid = ours
  want_down, want_mid = theirs
  assert len(down) == len(want_down) == 4  # conv_in, one layer each, one downsampler.
  for got, want in zip([*down, mid], [*want_down, want_mid]):
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize('guess_mode', [False, True], ids=['scaled', 'guess_mode'])
def test_controlnet_matches_diffusers_controlnetmodel(guess_mode):
  ours_unet, _, theirs = _pair()
  cn = controlnet.from_unet(ours_unet, 3, EMBEDDING)
  assert cn.control_size == 16
  reference = jax.eval_shape(lambda: cn.init(jax.random.PRNGKey(0),
                                             *controlnet.dummy_inputs(cn, 12))['params'])
  state = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
  params = convert.params_from_torch_state_dict(state, reference)  # Every key used.
  z, t, control, context = _inputs()
  got = cn.apply({'params': params}, z, t, control, context, None, 0.7, guess_mode)
  _close(got, _torch_residuals(theirs, z, t, control, context, 0.7, guess_mode))


def test_controlnet_folder_round_trip_and_a_foreign_base(tmp_path):
  import diffusers  # pylint: disable=g-import-not-at-top
  ours_unet, _, theirs = _pair()
  theirs.save_pretrained(tmp_path / 'theirs')
  cn, params = controlnet.load(tmp_path / 'theirs', ours_unet, context_width=12)
  z, t, control, context = _inputs(2)
  want = _torch_residuals(theirs, z, t, control, context, 1.0, False)
  _close(cn.apply({'params': params}, z, t, control, context), want)
  # Ours written back: diffusers opens it and computes the same residuals.
  controlnet.save(tmp_path / 'ours', cn, params, 12)
  again = diffusers.ControlNetModel.from_pretrained(tmp_path / 'ours').eval()
  _close(cn.apply({'params': params}, z, t, control, context),
         _torch_residuals(again, z, t, control, context, 1.0, False))
  # A ControlNet made for another base is refused before its weights are read.
  wider = ours_unet.clone(block_out_channels=(16, 64))
  with pytest.raises(errors.ConfigError, match='another base architecture: block_out_channels'):
    controlnet.load(tmp_path / 'ours', wider, context_width=12)
  with pytest.raises(errors.ConfigError, match='cross_attention_dim'):
    controlnet.load(tmp_path / 'ours', ours_unet, context_width=16)
  with pytest.raises(errors.MissingFileError, match='config.json not found'):
    controlnet.load(tmp_path / 'nothing', ours_unet)


class _Controlled(nn.Module):
  """The smallest denoiser with a ControlNet: the U-Net and the ControlNet side by side."""
  unet: unet.ConditionalUNet
  controlnet: nn.Module | None = None

  def __call__(self, z, t, context, control=None, scale=1.0):
    return unet.controlled_unet(self, z, t, context, None, False, control, scale, False)


def test_fresh_controlnet_leaves_the_base_exactly_and_scale_zero_too():
  ours_unet, _, _ = _pair()
  z, t, control, context = _inputs(3)
  base_params = ours_unet.init(jax.random.PRNGKey(0), z, t, context=context)['params']
  want = np.asarray(jax.jit(ours_unet.apply)({'params': base_params}, z, t, context=context))
  cn = controlnet.from_unet(ours_unet, 3, EMBEDDING)
  model = _Controlled(ours_unet, cn)
  apply = jax.jit(lambda params, scale: model.apply({'params': params}, z, t, context, control,
                                                    scale))
  fresh = controlnet.init_params(cn, base_params, jax.random.PRNGKey(1), 12)
  for key in ('conv_in', 'time_embedding', 'down_blocks_0.resnets_0', 'mid_block.attentions_0'):
    assert jax.tree.all(jax.tree.map(np.array_equal, fresh[key], base_params[key]))
  np.testing.assert_array_equal(apply({'unet': base_params, 'controlnet': fresh}, 1.0), want)
  # Trained (random) zero convolutions change the output, except at conditioning_scale 0.
  moved = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(2), a.shape),
                       fresh)
  params = {'unet': base_params, 'controlnet': moved}
  assert np.abs(apply(params, 1.0) - want).max() > 1e-3
  np.testing.assert_array_equal(apply(params, 0.0), want)
  with pytest.raises(ValueError, match=r'control images \[B, 16, 16, 3\], got \(2, 8, 8, 3\)'):
    jax.eval_shape(lambda p: model.apply({'params': p}, z, t, context, control[:, ::2, ::2]),
                   params)


def test_control_maps():
  picture = np.zeros((1, 64, 64, 3), np.uint8)
  picture[:, 16:48, 16:48] = 255  # A white square: edges on its border only.
  edges = maps.control_maps(picture, 'canny')
  assert edges.shape == picture.shape and edges.dtype == np.uint8
  assert set(np.unique(edges)) == {0, 255}
  ys, xs = np.nonzero(edges[0, ..., 0])
  assert ys.min() >= 14 and ys.max() <= 49 and xs.min() >= 14 and xs.max() <= 49
  assert not edges[0, 20:44, 20:44].any()  # Nothing inside, nothing outside.
  scribble = maps.control_maps(picture, 'scribble', thickness=2)
  assert set(np.unique(scribble)) == {0, 255}
  assert (scribble > 0).sum() > 2 * (edges > 0).sum()  # Bold strokes over the same outline.
  assert not scribble[0, 24:40, 24:40].any()
  with pytest.raises(ValueError, match='detector'):
    maps.control_maps(picture, 'hed')


def _f1_float64(edges, reference, tolerance):
  """The edge F1 by brute force: distances between every pair of edge pixels."""
  scores = []
  for e, r in zip(edges, reference):
    pe, pr = np.argwhere(e).astype(np.float64), np.argwhere(r).astype(np.float64)
    if len(pe) == 0 and len(pr) == 0:
      scores.append(1.0)
      continue
    if len(pe) == 0 or len(pr) == 0:
      scores.append(0.0)
      continue
    d = np.abs(pe[:, None, :] - pr[None, :, :]).max(-1)  # Chebyshev.
    precision = (d.min(1) <= tolerance).mean()
    recall = (d.min(0) <= tolerance).mean()
    scores.append(0.0 if precision + recall == 0 else
                  2 * precision * recall / (precision + recall))
  return np.array(scores)


@pytest.mark.parametrize('tolerance', [0, 1, 2])
def test_edge_f1_matches_brute_force(tolerance):
  rng = np.random.default_rng(tolerance)
  edges = rng.uniform(size=(6, 24, 24)) < 0.05
  reference = np.roll(edges, 1, axis=2) | (rng.uniform(size=(6, 24, 24)) < 0.03)
  edges[4], reference[5] = False, False  # An empty map on either side.
  edges[3], reference[3] = False, False  # Both empty: perfect agreement.
  np.testing.assert_allclose(maps.edge_f1(edges, reference, tolerance),
                             _f1_float64(edges, reference, tolerance), atol=1e-12)
  assert maps.edge_f1(edges[:3], edges[:3], tolerance).tolist() == [1.0] * 3


@pytest.mark.parametrize('guess_mode', [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=['scaled', 'guess_mode'])
def test_sd_pipeline_with_a_controlnet_matches_diffusers(sd_folder, tmp_path, guess_mode):
  """Our SD sampling steered by a diffusers ControlNetModel folder, against diffusers'
  StableDiffusionControlNetPipeline: the same images within uint8 rounding."""
  import torch  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  from latent.sd import pipeline  # pylint: disable=g-import-not-at-top
  from test_latent_pipeline import _images  # pylint: disable=g-import-not-at-top
  folder, reference = sd_folder
  theirs = diffusers.ControlNetModel.from_unet(reference.unet,
                                               conditioning_embedding_out_channels=(8, 16))
  torch.manual_seed(0)
  with torch.no_grad():
    for p in theirs.parameters():
      p.add_(0.1 * torch.randn_like(p))
  theirs.save_pretrained(tmp_path / 'cn')
  ours = pipeline.load(folder)
  cn = controlnet.load(tmp_path / 'cn', ours.unet, ours.unet_params, 32)
  pictures = np.zeros((2, 16, 16, 3), np.uint8)
  pictures[0, 4:12, 4:12], pictures[1, 2:9, 6:15] = 255, 200
  control = maps.control_maps(pictures, 'canny')
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  prompts = ['red hair', 'hair']
  pipe = diffusers.StableDiffusionControlNetPipeline(
      **{k: v for k, v in reference.components.items() if k != 'image_encoder'},
      controlnet=theirs.eval())
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    want = pipe(prompts, negative_prompt=['red'] * 2, image=[Image.fromarray(m) for m in control],
                num_inference_steps=6, guidance_scale=3.0, controlnet_conditioning_scale=0.8,
                guess_mode=guess_mode, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                output_type='np').images
  want = _images(want.astype(np.float32))
  got = pipeline.generate(ours, prompts, negative_prompt='red', guidance_scale=3.0,
                          latents=latents, sampler='ddim', num_steps=6, controlnet=cn,
                          guess_mode=guess_mode, control=controlnet.as_input(control),
                          control_scale=0.8)
  assert np.abs(got.astype(np.int32) - want).max() <= 1
  plain = pipeline.generate(ours, prompts, negative_prompt='red', guidance_scale=3.0,
                            latents=latents, sampler='ddim', num_steps=6)
  assert np.abs(got.astype(np.int32) - plain).mean() > 1  # The ControlNet steered it.
  if guess_mode:
    return
  # The command line: a pipeline folder, the ControlNet folder and control maps as files.
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  from common import imageio  # pylint: disable=g-import-not-at-top
  for i, m in enumerate(control):
    imageio.save_image(m, tmp_path / 'maps' / f'{i}.png')
  command = [sys.executable, '-m', 'latent.main', '--config=latent/configs/sd_pipeline.py',
             f'--workdir={tmp_path / "run"}', '--mode=sample', f'--config.pipeline={folder}',
             f'--config.controlnet.folder={tmp_path / "cn"}', "--config.sample.prompts=('hair',)",
             '--config.sample.num_per_prompt=2', '--config.sample.num_steps=4',
             '--config.sample.control_is_map=True']
  repo = Path(__file__).resolve().parents[1]
  run = lambda *extra: subprocess.run(command + list(extra), cwd=repo, capture_output=True,
                                      text=True, timeout=600)
  proc = run(f'--config.sample.control_image={tmp_path / "maps"}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(list((tmp_path / 'run' / 'samples').glob('*.jpg'))) == 2
  grid = imageio.read_image(tmp_path / 'run' / 'samples_control_grid.png')
  assert grid.shape[1] > 4 * 16  # Two (map | image) pairs side by side.
  bad = run(f'--config.sample.control_image={tmp_path / "nowhere"}')
  assert bad.returncode == 2 and 'sample.control_image' in bad.stderr and 'nowhere' in bad.stderr
  assert 'loading the pipeline' not in bad.stderr  # Found before any weights are read.
