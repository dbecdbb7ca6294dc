"""Sampling a trained stage 2: prompts -> images, image-to-image and inpainting.

  python -m latent.main --config=latent/configs/ldm_anime_text.py --workdir=DIR --mode=sample \
      --config.sample.prompts="('red hair and green eyes', 'blonde short hair')"

writes OUT/1.jpg ... (config.sample.num_per_prompt per prompt, prompt by
prompt), OUT/captions.tsv (file, prompt) and OUT_grid.png beside the folder,
one captioned row per prompt. With sample.init_image it runs SDEdit from that
picture at sample.strength; with sample.mask too, it inpaints: white mask
pixels are generated, black ones kept from the picture.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from common import errors, experiment, imageio, logs, lora, mesh as mesh_lib
from latent.configs import ldm_base
from latent.controlnet import maps as maps_lib
from latent.controlnet import model as controlnet_lib
from latent.finetune import embeddings, hypernetwork
from latent.finetune import experiment as finetune_lib
from latent.ldm import conditions as conditions_lib
from latent.ldm import sampler, train
from latent.vae.codec import Codec, encode_images


def restore(config, workdir: str | Path, use_ema: bool = True):
  """(model, params, conditions, stage1) of a stage-2 or fine-tuning workdir's latest
  checkpoint, with the sample.adapters (LoRA), sample.embeddings (textual inversion) and
  sample.hypernetwork files applied."""
  exp, params = restore_experiment(config, workdir, use_ema)
  return exp.model, params, exp.conds, exp.stage1


def restore_experiment(config, workdir: str | Path, use_ema: bool = True):
  """(the run's Experiment, its parameters with the sample.* files applied)."""
  if config.stage == 'finetune':
    exp = finetune_lib.for_sampling(config, workdir)
  else:
    exp = train.Experiment(config)
    exp.stage1 = Codec.from_workdir(config.vae_workdir)
    exp.conds = conditions_lib.Conditions.load(workdir)
  state = experiment.restore_for_sampling(
      exp, workdir, 'train first with --mode=train and the same --workdir.')
  logging.info('Sampling with the %s parameters of step %d.', 'EMA' if use_ema else 'raw',
               int(state.step))
  params = exp.rules.of_state(state, use_ema)
  s = config.sample
  params = lora.apply_files(params, s.adapters)
  files = [s.embeddings] if isinstance(s.embeddings, str) else list(s.embeddings)
  params, conds = embeddings.apply_files(params, exp.conds, files)
  params = hypernetwork.apply_file(params, s.hypernetwork, config.conditioning.width)
  if conds is not exp.conds:
    exp.conds = conds
    exp.__dict__.pop('model', None)  # Rebuilt with the added tokens' rows.
  return exp, params


def read_prompts(s) -> list[str]:
  if s.prompt_file:
    path = Path(s.prompt_file)
    if not path.is_file():
      raise errors.MissingFileError(f'sample.prompt_file {path} does not exist.')
    prompts = [l.strip() for l in path.read_text(encoding='utf-8').splitlines() if l.strip()]
    if not prompts:
      raise errors.DataError(f'sample.prompt_file {path} holds no prompt.')
    return prompts
  return [s.prompts] if isinstance(s.prompts, str) else list(s.prompts)


def read_init_images(path: str | Path, size: int, key: str = 'sample.init_image') -> np.ndarray:
  """uint8 [N, size, size, 3] from one picture or a folder of them (resized to `size`)."""
  path = Path(path)
  if path.is_dir():
    return imageio.load_images(path, size=size)[0]
  if not path.is_file():
    raise errors.MissingFileError(f'{key} {path} does not exist.')
  try:
    return imageio.read_image(path, size)[None]
  except OSError as e:
    raise errors.DataError(f'{key} {path} is not a readable image ({e}).') from e


def read_control(config, n: int, size: int) -> np.ndarray | None:
  """uint8 control maps [n, size, size, 3] cycling over sample.control_image's pictures (made
  into maps with config.controlnet.detector unless sample.control_is_map); None if unset."""
  s = config.sample
  if not s.get('control_image'):
    return None
  pictures = read_init_images(s.control_image, size, 'sample.control_image')
  if s.control_is_map:
    maps = pictures
  else:
    c = config.controlnet
    maps = maps_lib.control_maps(pictures, c.detector, c.low_threshold, c.high_threshold,
                                   c.thickness)
  return np.resize(maps, (n, *maps.shape[1:]))  # Cycles over the pictures.


def read_mask(path: str | Path, image_size: int, latent_size: int) -> np.ndarray:
  """keep [1, h, w, 1] float32 on the latent grid: 1 where the mask is dark (keep the picture).

  diffusers' inpainting pipelines' rule, so the same picture and mask give the same latent
  mask: the mask is resized to the image (Lanczos), made grayscale, binarised at 0.5 (white
  = repaint), then resized to the latent grid by nearest neighbour (torch's
  `interpolate(mode='nearest')` in `prepare_mask_latents`: the top-left pixel of each patch).
  """
  repaint = _repaint(path, image_size)
  index = np.arange(latent_size) * image_size // latent_size  # torch's nearest source rows.
  repaint = repaint[index][:, index]
  return (~repaint).astype(np.float32)[None, :, :, None]


def read_pixel_mask(path: str | Path, image_size: int) -> np.ndarray:
  """keep [1, H, W, 1] float32 per pixel (the binarised mask of `read_mask`): what diffusers'
  inpainting pipelines multiply the picture by before an inpainting U-Net encodes it."""
  return (~_repaint(path, image_size)).astype(np.float32)[None, :, :, None]


def _repaint(path: str | Path, image_size: int) -> np.ndarray:
  """bool [H, W]: the mask resized to the image (Lanczos), grayscale, >= 0.5 (diffusers'
  VaeImageProcessor with do_binarize)."""
  path = Path(path)
  if not path.is_file():
    raise errors.MissingFileError(f'sample.mask {path} does not exist.')
  try:
    with Image.open(path) as img:
      gray = img.resize((image_size, image_size), Image.Resampling.LANCZOS).convert('L')
  except OSError as e:
    raise errors.DataError(f'sample.mask {path} is not a readable image ({e}).') from e
  return np.asarray(gray, np.float32) / 255.0 >= 0.5


def read_picture_and_mask(s, n: int, image_size: int, latent_size: int):
  """(uint8 pictures [n, size, size, 3] cycling over sample.init_image, keep [n, h, w, 1] of
  sample.mask): None for what the config does not name."""
  if not s.init_image:
    return None, None
  pictures = read_init_images(s.init_image, image_size)
  pictures = np.resize(pictures, (n, *pictures.shape[1:]))  # Cycles over the pictures.
  keep = None
  if s.mask:
    keep = np.broadcast_to(read_mask(s.mask, image_size, latent_size),
                           (n, latent_size, latent_size, 1))
  return pictures, keep


def write_captioned(images: np.ndarray, prompts: list[str], num_per_prompt: int, out: Path,
                    caption_for, guidance_scale: float) -> None:
  """OUT/1.jpg ..., OUT/captions.tsv (file, caption_for(prompt)) and a captioned grid beside."""
  if jax.process_index() != 0:
    return
  files = imageio.write_numbered(images, out)
  rows = [f'{f.name}\t{caption_for(p)}'
          for f, p in zip(files, (p for p in prompts for _ in range(num_per_prompt)))]
  # The captions.tsv format of the data sets: `python -m metrics attributes OUT` scores it.
  (out / 'captions.tsv').write_text('file\tcaption\n' + '\n'.join(rows) + '\n', encoding='utf-8')
  captions = [f'{p}  (guidance {guidance_scale:g})' for p in prompts]
  imageio.save_image(imageio.captioned_grid(images, captions, num_per_prompt),
                     out.parent / f'{out.name}_grid.png')


def write_control_grid(maps: np.ndarray | None, images: np.ndarray, out: Path) -> None:
  """OUT_control_grid.png beside OUT: each control map beside its image."""
  if maps is None or jax.process_index() != 0:
    return
  grid = out.parent / f'{out.name}_control_grid.png'
  imageio.save_image(maps_lib.control_grid(maps, images), grid)
  logging.info('Wrote the control maps beside their images to %s.', grid)


def sample_batches(sample_fn, params, vae_params, ids, latent_shape, seed: int, batch_size: int,
                   guidance_scale, init_z0=None, keep=None, maps=None, control_scale=1.0,
                   negative_ids=None, masked_z0=None) -> np.ndarray:
  """uint8 images of the one guided sampler's `sample_fn` for every row of `ids`, in batches
  of batch_size, each with its own noise and sampler key split from `seed`; the other
  per-row inputs (None: unused) are sliced with them. The LDM, fine-tuned runs and SD
  pipelines sample through it."""
  rng, images, n = jax.random.PRNGKey(seed), [], len(ids)
  for i in range(0, n, batch_size):
    rng, noise_rng, step_rng = jax.random.split(rng, 3)
    b = min(batch_size, n - i)
    noise = jax.random.normal(noise_rng, (b, *latent_shape))
    part = lambda a: None if a is None else jnp.asarray(a[i:i + b])
    control = None if maps is None else controlnet_lib.as_input(maps[i:i + b])
    x = sample_fn(params, vae_params, step_rng, part(ids), noise, guidance_scale, part(init_z0),
                  part(keep), control, control_scale, part(negative_ids), part(masked_z0))
    images.append(imageio.to_uint8(mesh_lib.gather(x)))
  return np.concatenate(images)


def generate(config, workdir: str | Path) -> Path:
  if config.stage == 'ldm':
    ldm_base.validate(config)
  s = config.sample
  out = Path(s.output_dir or Path(workdir) / 'samples')
  exp, params = restore_experiment(config, workdir, s.use_ema)
  model, conds, stage1 = exp.model, exp.conds, exp.stage1
  if not config.get('pipeline'):
    ldm_base.validate_values(config, stage1.factor)
  prompts = read_prompts(s)
  ids = np.repeat(conds.prompt_ids(prompts), s.num_per_prompt, axis=0)
  n, u = len(ids), model.unet

  pictures, keep = read_picture_and_mask(s, n, config.data.image_size, u.sample_size)
  maps = read_control(config, n, config.data.image_size)
  if maps is None and config.get('method') == 'controlnet':
    logging.warning('No sample.control_image: sampling the base model alone (the ControlNet '
                    'steers nothing without a control image).')
  init_z0, strength = None, 1.0
  if pictures is not None:
    init_z0 = encode_images(stage1.model, stage1.params, stage1.scale_factor, pictures,
                            s.batch_size)  # Posterior means, scaled.
    strength = s.strength
  sample_fn = sampler.for_config(config, model, exp.schedule, stage1, exp.sampler_options(),
                                 strength=strength, inpaint=keep is not None,
                                 guess_mode=bool(s.get('guess_mode')))

  with logs.Timed(f'sampling {n} images for {len(prompts)} prompt(s) with {s.sampler} '
                  '(the first batch compiles the sampler)'):
    images = sample_batches(sample_fn, params, stage1.params, ids,
                            (u.sample_size, u.sample_size, u.in_channels), s.seed, s.batch_size,
                            s.guidance_scale, init_z0, keep, maps, s.get('control_scale', 1.0))
  write_captioned(images, prompts, s.num_per_prompt, out, conds.caption_for, s.guidance_scale)
  write_control_grid(maps, images, out)
  logging.info('Wrote %d images for %d prompts to %s.', n, len(prompts), out)
  return out
