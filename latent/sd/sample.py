"""`--mode=sample` of a Stable Diffusion pipeline folder (latent/configs/sd_pipeline.py):
text-to-image, image-to-image, inpainting and ControlNet, written as stage 2's samples are
(OUT/1.jpg ..., OUT/captions.tsv, OUT_grid.png, OUT_control_grid.png)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from common import logs, lora
from latent.configs import sd_pipeline
from latent.controlnet import model as controlnet_lib
from latent.ldm import sample as ldm_sample
from latent.sd import pipeline as pipeline_lib


def generate(config, workdir: str | Path) -> Path:
  """Samples config.sample's prompts with the pipeline folder config.pipeline."""
  sd_pipeline.validate(config)
  s = config.sample
  out = Path(s.output_dir or Path(workdir) / 'samples')
  prompts = ldm_sample.read_prompts(s)
  with logs.Timed(f'loading the pipeline {config.pipeline}'):
    pipe = pipeline_lib.load(config.pipeline, jnp.bfloat16 if config.dtype == 'bfloat16'
                             else jnp.float32)
  if s.adapters:  # LoRA files name the U-Net's modules under 'unet.', as diffusers' do.
    unet = lora.apply_files({'unet': pipe.unet_params}, s.adapters)['unet']
    pipe = dataclasses.replace(pipe, unet_params=unet)
  pipe = pipeline_lib.with_embeddings(pipe, s.embeddings)
  all_prompts = [p for p in prompts for _ in range(s.num_per_prompt)]
  n, size, channels = len(all_prompts), pipe.unet.sample_size, pipe.vae.latent_channels
  image_size = size * pipe.vae.downsampling_factor
  pictures, keep = ldm_sample.read_picture_and_mask(s, n, image_size, size)
  init_z0 = masked_z0 = None
  if pictures is not None:
    init_z0 = pipeline_lib.encode_images(pipe, pictures, batch_size=s.batch_size)
  if keep is not None and pipe.unet.in_channels > channels:
    # An inpainting U-Net sees the picture masked per pixel, as diffusers' pipeline makes it.
    pixel_keep = np.broadcast_to(ldm_sample.read_pixel_mask(s.mask, image_size),
                                 (n, image_size, image_size, 1))
    masked_z0 = pipeline_lib.encode_images(pipe, pictures, pixel_keep, s.batch_size)
  maps, cn = ldm_sample.read_control(config, n, image_size), None
  if maps is not None:
    cn = controlnet_lib.load(config.controlnet.folder, pipe.unet, pipe.unet_params,
                             pipe.text_encoder.hidden_size, pipe.vae.downsampling_factor,
                             pipe.unet.dtype)
  sample_fn, params, vae_params = pipeline_lib.make_sample_fn(
      pipe, s.sampler, s.num_steps, s.eta, s.karras_sigmas,
      strength=s.strength if s.init_image else 1.0, inpaint=keep is not None, controlnet=cn,
      guess_mode=s.guess_mode)
  negative = pipeline_lib.prompt_ids(pipe, [s.negative_prompt] * n)
  with logs.Timed(f'sampling {n} images with {s.sampler} x{s.num_steps} '
                  '(the first batch compiles the sampler)'):
    images = ldm_sample.sample_batches(
        sample_fn, params, vae_params, pipeline_lib.prompt_ids(pipe, all_prompts),
        (size, size, channels), s.seed, s.batch_size, jnp.float32(s.guidance_scale), init_z0,
        keep, maps, s.control_scale, negative, masked_z0)
  ldm_sample.write_captioned(images, prompts, s.num_per_prompt, out, lambda p: p,
                             s.guidance_scale)
  ldm_sample.write_control_grid(maps, images, out)
  logging.info('Wrote %d images for %d prompts to %s.', len(all_prompts), len(prompts), out)
  return out
