"""Stable Diffusion pipeline folders (diffusers' layout) as our modules: load and sample.

A folder written by diffusers' `StableDiffusionPipeline.save_pretrained` holds
`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and `scheduler/`.
`load` reads each with safetensors' numpy API (no torch) into the Flax modules
here: `latent.ldm.unet.ConditionalUNet` (SD 1.x and 2.x layouts, `latent.sd.config`),
`latent.vae.autoencoder`, `latent.sd.clip`; the scheduler's betas, prediction type and
timestep settings become a `ddpm.schedules.Schedule` and sampler options. `make_sample_fn` / `generate` are SD's
text-to-image, image-to-image and inpainting with classifier-free guidance (the negative
prompt as the unconditional context) on any of ddpm.samplers' samplers, as diffusers'
pipelines run them. `save` writes a (fine-tuned) pipeline back as a diffusers folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common import atomic, errors, imageio, mesh as mesh_lib
from ddpm import convert, schedules
from latent.finetune import embeddings
from latent.ldm import sampler as sampler_lib
from latent.ldm.unet import ConditionalUNet
from latent.sd import clip, config as sd_config
from latent.sd.denoiser import PipelineDenoiser
from latent.vae import autoencoder
from latent.vae.codec import Codec

PARTS = ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler')


@dataclasses.dataclass
class Pipeline:
  unet: ConditionalUNet
  unet_params: Any
  vae: autoencoder.AutoencoderKL
  vae_params: Any
  scaling_factor: float
  text_encoder: clip.CLIPTextModel
  text_params: Any
  tokenizer: clip.Tokenizer
  schedule: schedules.Schedule
  sampler_options: dict  # prediction, spacing, steps_offset, final_alpha_cumprod, clip_x0.
  configs: dict | None = None  # The folder's own configs and model_index.json (`save`).


def save_unet(folder: str | Path, unet: ConditionalUNet, params, cross_attention_dim: int) -> Path:
  """Writes a UNet2DConditionModel folder (from_pretrained opens it) of our U-Net."""
  return convert.save_diffusers_folder(folder, 'UNet2DConditionModel',
                                       sd_config.unet_diffusers_config(unet, cross_attention_dim), params)


def save_vae(folder: str | Path, vae: autoencoder.AutoencoderKL, params,
             scaling_factor: float) -> Path:
  """Writes an AutoencoderKL folder (from_pretrained opens it) of our autoencoder."""
  config = dict(autoencoder.diffusers_config(vae), scaling_factor=float(scaling_factor))
  return convert.save_diffusers_folder(folder, 'AutoencoderKL', config, params)


def load(folder: str | Path, dtype=jnp.float32, mesh=None) -> Pipeline:
  """Every part of a diffusers Stable Diffusion pipeline folder, as our modules.

  `dtype` is the weights' and the computation's (bfloat16: attention logits, softmax and
  the samplers' arithmetic stay float32, as diffusers' upcast_attention).

  The weights are placed on `mesh` (default: this process's devices, config-free) by the
  training seam's rules (common.mesh.state_shardings): with mesh.fsdp > 1 each device holds
  its share of every large array, so a pipeline larger than one device fits.
  """
  folder = Path(folder)
  sd_config.refuse_single_file(folder)
  index = sd_config.read_json(folder / 'model_index.json')
  for part in PARTS:
    if part not in index:
      raise errors.ConfigError(f'{folder}/model_index.json has no {part!r}: not a Stable '
                               'Diffusion pipeline.')
  # Every config is read and checked before any weights are; `save` writes them back.
  configs = {'model_index': index, 'unet': sd_config.read_json(folder / 'unet' / 'config.json'),
             'vae': sd_config.read_json(folder / 'vae' / 'config.json'),
             'text_encoder': sd_config.read_json(folder / 'text_encoder' / 'config.json'),
             'scheduler': sd_config.read_json(folder / 'scheduler' / 'scheduler_config.json')}
  unet = sd_config.unet_from_config(configs['unet'], dtype)
  autoencoder.from_diffusers_config(configs['vae'], dtype, str(folder / 'vae' / 'config.json'))
  clip.from_config(configs['text_encoder'], dtype)
  schedule, options = sd_config.schedule_from_config(configs['scheduler'])
  tokenizer = clip.Tokenizer(folder / 'tokenizer',
                             table_size=configs['text_encoder'].get('vocab_size'))

  def converted(part, fn, *args):
    """Weights that do not fit the config: one error naming the component and the tensor."""
    try:
      return fn(folder / part, *args)
    except errors.UserError:
      raise
    except (KeyError, ValueError) as e:
      raise errors.ConfigError(f'{folder / part}: {e.args[0] if e.args else e}') from e

  text_encoder, text_params = converted('text_encoder', clip.load, dtype)
  width = text_encoder.hidden_size
  reference = jax.eval_shape(
      lambda: unet.init(jax.random.PRNGKey(0), jnp.zeros((1, unet.sample_size, unet.sample_size,
                                                          unet.in_channels)),
                        jnp.zeros((1,)), context=jnp.zeros((1, 1, width))))['params']
  unet_params = converted('unet', convert.load_diffusers_unet, reference)
  vae, vae_params, scaling_factor = converted('vae', autoencoder.load_diffusers_vae, dtype)
  mesh = mesh if mesh is not None else mesh_lib.make_mesh()
  # Weights are stored in the compute dtype, as diffusers' torch_dtype: bfloat16 halves them.
  place = lambda tree: mesh_lib.place(jax.tree.map(lambda x: jnp.asarray(x, dtype), tree), mesh)
  return Pipeline(unet, place(unet_params), vae, place(vae_params), scaling_factor, text_encoder,
                  place(text_params), tokenizer, schedule, options, configs)


def save(pipe: Pipeline, folder: str | Path) -> Path:
  """Writes `pipe` (loaded, then fine-tuned or given adapters and embeddings) as a diffusers
  StableDiffusionPipeline folder that from_pretrained opens. The folder must not exist yet;
  it appears whole (written beside it first, then renamed)."""
  folder = Path(folder)
  if folder.exists():
    raise errors.WorkdirError(f'{folder} exists; pick a new folder for the pipeline.')
  return atomic.new_folder(folder, lambda path: write(pipe, path))


def write(pipe: Pipeline, folder: Path) -> None:
  """The pipeline folder's files into `folder` (a fresh path; `save` makes it appear whole)."""
  if pipe.configs is None:
    raise errors.ConfigError('Only a pipeline made by pipeline.load (it keeps the folder\'s '
                             'configs) can be saved as one.')
  if pipe.text_encoder.added_tokens and pipe.tokenizer.base_size != pipe.tokenizer.table_size:
    raise errors.ConfigError('The tokenizer has fewer tokens than the text encoder\'s table, so '
                             'added tokens would get other ids in transformers.')
  # The folder's own configs (every key, e.g. upcast_attention), with our weights.
  own = lambda part: {k: v for k, v in pipe.configs[part].items() if not k.startswith('_')}
  convert.save_diffusers_folder(folder / 'unet', 'UNet2DConditionModel', own('unet'),
                                pipe.unet_params)
  convert.save_diffusers_folder(folder / 'vae', 'AutoencoderKL',
                                dict(own('vae'), scaling_factor=pipe.scaling_factor),
                                pipe.vae_params)
  clip.save(folder / 'text_encoder', pipe.text_encoder, pipe.text_params,
            pipe.configs['text_encoder'])
  pipe.tokenizer.tokenizer.save_pretrained(str(folder / 'tokenizer'))
  (folder / 'scheduler').mkdir()
  (folder / 'scheduler' / 'scheduler_config.json').write_text(
      json.dumps(pipe.configs['scheduler'], indent=2) + '\n')
  # Parts not written here (a safety checker) are left out of the index.
  index = {k: v for k, v in pipe.configs['model_index'].items()
           if k.startswith('_') or not isinstance(v, list) or k in PARTS}
  index.update(safety_checker=[None, None], feature_extractor=[None, None],
               requires_safety_checker=False)
  (folder / 'model_index.json').write_text(json.dumps(index, indent=2) + '\n')


def with_embeddings(pipe: Pipeline, paths) -> Pipeline:
  """`pipe` with the tokens of textual-inversion files (diffusers' learned_embeds layout)
  added to its tokenizer and their rows to its text encoder."""
  paths = [paths] if isinstance(paths, str) else list(paths)
  if not paths:
    return pipe
  params, tokenizer = embeddings.apply_files({'encoder': pipe.text_params}, pipe.tokenizer, paths)
  encoder = pipe.text_encoder.clone(
      added_tokens=tokenizer.vocab_size - pipe.text_encoder.vocab_size)
  return dataclasses.replace(pipe, text_encoder=encoder, text_params=params['encoder'],
                             tokenizer=tokenizer)


def codec(pipe: Pipeline) -> Codec:
  """The pipeline's VAE and scaling factor as stage 2's codec (encode, decode)."""
  return Codec(pipe.vae, pipe.vae_params, pipe.scaling_factor)


def null_ids(pipe: Pipeline) -> tuple[int, ...]:
  """The empty prompt's token ids: SD's unconditional input (it has no learned null)."""
  return tuple(int(i) for i in pipe.tokenizer([''])[0][0])


def denoiser(pipe: Pipeline, controlnet: tuple | None = None):
  """(PipelineDenoiser, its parameters {'unet', 'encoder'[, 'controlnet']}): the pipeline's
  U-Net and CLIP text encoder (and `controlnet` = (ControlNet, its params)) behind the
  denoiser interface of the one guided sampler (latent.ldm.sampler)."""
  model = PipelineDenoiser(pipe.unet, pipe.text_encoder, null_ids(pipe),
                           None if controlnet is None else controlnet[0])
  params = {'unet': pipe.unet_params, 'encoder': pipe.text_params}
  if controlnet is not None:
    params['controlnet'] = controlnet[1]
  return model, params


def prompt_ids(pipe: Pipeline, prompts: list[str]) -> np.ndarray:
  """Prompts -> CLIP token ids [B, max_length] (padded, as SD's pipelines feed them)."""
  return np.asarray(pipe.tokenizer(list(prompts))[0], np.int32)


def sampler_options(pipe: Pipeline, sampler: str) -> dict:
  """The folder's scheduler settings as `samplers.sample` keywords for `sampler`."""
  options = dict(pipe.sampler_options)
  if sampler not in ('ddim', 'ddpm'):
    options.pop('final_alpha_cumprod')  # Only DDIM's last step has it.
  return options


def make_sample_fn(pipe: Pipeline, sampler: str = 'ddim', num_steps: int = 50, eta: float = 0.0,
                   karras: bool = False, strength: float = 1.0, inpaint: bool = False,
                   controlnet: tuple | None = None, guess_mode: bool = False,
                   decode: bool = True):
  """(fn, params, vae_params): SD's text-to-image with classifier-free guidance as the one
  guided sampler's jitted fn(params, vae_params, rng, ids, noise, guidance_scale, init_z0,
  keep, control, control_scale, negative_ids, masked_z0) -> images in [-1, 1] (the final
  latents with decode=False), and the pipeline's weights to pass it (arguments, never
  constants of the program).

  As diffusers' pipelines: the negative prompt's ids are guidance's unconditional input;
  `init_z0` (scaled latents of a picture) starts the last int(strength * num_steps) steps
  from the picture noised with `noise`; with `inpaint`, latents where `keep` [B, h, w, 1] is
  1 are re-imposed from init_z0, noised with that same noise, after every step. An
  inpainting U-Net (9 input channels, SD-inpainting) instead sees the mask and `masked_z0`
  (encode_images(..., keep): the picture with the repainted region grey) beside x_t.
  `controlnet` = (latent.controlnet.model.ControlNet, its params) steers the U-Net with the
  `control` images [B, H, W, C] in [0, 1] at `control_scale`, as diffusers'
  StableDiffusionControlNetPipeline, guess mode included.
  """
  model, params = denoiser(pipe, controlnet)
  options = dict(sampler_options(pipe, sampler), sampler=sampler, num_steps=num_steps, eta=eta,
                 karras=karras)
  fn = sampler_lib.make_sample_fn(model, pipe.schedule, codec(pipe), options, strength=strength,
                                  inpaint=inpaint, decode=decode, guess_mode=guess_mode)
  return fn, params, pipe.vae_params


def encode_images(pipe: Pipeline, images_uint8: np.ndarray, keep: np.ndarray | None = None,
                  batch_size: int = 8) -> np.ndarray:
  """uint8 [N, H, W, 3] -> scaled latents (the posterior mean; diffusers draws from it).

  With `keep` [N, H, W, 1] (per pixel, or [N, h, w, 1] on the latent grid), the pixels where
  it is 0 are set to 0 in [-1, 1] first: the masked picture an inpainting U-Net is given.
  """
  vae, mesh = codec(pipe), mesh_lib.make_mesh()
  encode = jax.jit(vae.encode)  # The weights are its argument, not constants.
  if keep is None:
    keep = np.ones((*images_uint8.shape[:3], 1), np.float32)
  batches = zip(mesh_lib.padded_batches(images_uint8, batch_size, mesh),
                mesh_lib.padded_batches(keep, batch_size, mesh))
  return np.concatenate([mesh_lib.gather(encode(pipe.vae_params, x, k))[:count]
                         for (_, x, count), (_, k, _) in batches])


def generate(pipe: Pipeline, prompts: list[str], negative_prompt: str = '', seed: int = 0,
             guidance_scale: float = 7.5, latents: np.ndarray | None = None,
             init_z0: np.ndarray | None = None, keep: np.ndarray | None = None,
             masked_z0: np.ndarray | None = None, control: np.ndarray | None = None,
             control_scale: float = 1.0, **sampler_kwargs) -> np.ndarray:
  """uint8 images [len(prompts), H, W, 3]; `latents` [B, h, w, 4] replaces the seeded noise.

  `init_z0` (scaled latents, e.g. encode_images) with sampler_kwargs strength < 1 is
  image-to-image; `keep` [B, h, w, 1] (1 = keep the picture) inpaints (an inpainting
  U-Net also takes `masked_z0`); `control` [B, H, W, C] in [0, 1] steers sampler_kwargs'
  `controlnet` at `control_scale`.
  """
  u = pipe.unet
  if latents is None:
    latents = jax.random.normal(jax.random.PRNGKey(seed), (len(prompts), u.sample_size,
                                                           u.sample_size, pipe.vae.latent_channels))
  as_array = lambda a: None if a is None else jnp.asarray(a)
  fn, params, vae_params = make_sample_fn(pipe, inpaint=keep is not None, **sampler_kwargs)
  images = fn(params, vae_params, jax.random.PRNGKey(seed + 1), prompt_ids(pipe, prompts),
              jnp.asarray(latents), jnp.float32(guidance_scale), as_array(init_z0),
              as_array(keep), as_array(control), control_scale,
              prompt_ids(pipe, [negative_prompt] * len(prompts)), as_array(masked_z0))
  return imageio.to_uint8(np.asarray(images))
