"""Stable Diffusion pipeline folders (diffusers' layout) as our modules: load and sample.

A folder written by diffusers' `StableDiffusionPipeline.save_pretrained` holds
`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and `scheduler/`.
`load` reads each with safetensors' numpy API (no torch) into the Flax modules
here: `latent.unet.ConditionalUNet` (SD 1.x and 2.x layouts), `latent.autoencoder`,
`latent.clip`; the scheduler's betas, prediction type and timestep settings become a
`ddpm.schedules.Schedule` and sampler options. `make_sample_fn` / `generate` are SD's
text-to-image, image-to-image and inpainting with classifier-free guidance (the negative
prompt as the unconditional context) on any of ddpm.samplers' samplers, as diffusers'
pipelines run them. `save` writes a (fine-tuned) pipeline back as a diffusers folder.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common import errors, imageio, mesh as mesh_lib
from ddpm import convert, samplers, schedules
from latent import autoencoder, clip, guidance
from latent import controlnet as controlnet_lib
from latent.unet import ConditionalUNet

PARTS = ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler')
SINGLE_FILE = ('.ckpt', '.safetensors', '.pt', '.pth')  # The original SD checkpoint formats.
PREDICTIONS = {'epsilon': 'eps', 'v_prediction': 'v', 'sample': 'x0'}


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


def read_json(path: Path) -> dict:
  if not path.is_file():
    raise errors.MissingFileError(
        f'{path} not found: expected a diffusers Stable Diffusion pipeline folder '
        '(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), as '
        'StableDiffusionPipeline.save_pretrained writes it. Download one on a machine with '
        'network access, e.g. huggingface-cli download <repo> --local-dir DIR.')
  return json.loads(path.read_text())


def unet_from_config(cfg: dict, dtype=jnp.float32) -> ConditionalUNet:
  """Our ConditionalUNet for a diffusers UNet2DConditionModel config.json (SD 1.x / 2.x)."""
  unsupported = {k: cfg.get(k) for k in ('addition_embed_type', 'class_embed_type',
                                         'encoder_hid_dim', 'time_cond_proj_dim')
                 if cfg.get(k) is not None}
  if cfg.get('only_cross_attention') not in (None, False) or cfg.get('dual_cross_attention'):
    unsupported['cross attention'] = 'only/dual'
  if not cfg.get('flip_sin_to_cos', True) or cfg.get('freq_shift', 0):
    unsupported['time embedding'] = (cfg.get('flip_sin_to_cos'), cfg.get('freq_shift'))
  if cfg.get('mid_block_type', 'UNetMidBlock2DCrossAttn') != 'UNetMidBlock2DCrossAttn':
    unsupported['mid_block_type'] = cfg['mid_block_type']
  depth = cfg.get('transformer_layers_per_block', 1)
  if not isinstance(depth, int):
    depth = set(depth) if len(set(depth)) == 1 else depth
    depth = next(iter(depth)) if isinstance(depth, set) else depth
  if not isinstance(depth, int):
    unsupported['transformer_layers_per_block'] = depth
  if unsupported:
    raise errors.ConfigError(f'The UNet config uses what this port does not have (SDXL and '
                             f'other variants): {unsupported}.')
  channels = tuple(cfg['block_out_channels'])
  size = cfg['sample_size']
  attn = [t.startswith('CrossAttn') for t in cfg['down_block_types']]
  # diffusers' attention_head_dim is the number of heads (a historical name) unless
  # num_attention_heads is given.
  heads = cfg.get('num_attention_heads') or cfg.get('attention_head_dim', 8)
  heads = [heads] * len(channels) if isinstance(heads, int) else list(heads)
  head_dims = {c // h for c, h, a in zip(channels, heads, attn) if a}
  kw = {}
  if len(set(h for h, a in zip(heads, attn) if a)) == 1:
    kw['num_heads'] = next(h for h, a in zip(heads, attn) if a)
  elif len(head_dims) == 1:
    kw['head_dim'] = head_dims.pop()
  else:
    raise errors.ConfigError(f'attention heads {heads} for channels {channels}: neither the '
                             'same count nor the same width at every level.')
  return ConditionalUNet(
      sample_size=size, in_channels=cfg['in_channels'], out_channels=cfg['out_channels'],
      block_out_channels=channels, layers_per_block=cfg['layers_per_block'],
      attention_resolutions=tuple(size // 2**i for i, a in enumerate(attn) if a),
      norm_groups=cfg.get('norm_num_groups', 32), norm_eps=cfg.get('norm_eps', 1e-5),
      transformer_depth=depth, linear_projection=cfg.get('use_linear_projection', False),
      dtype=dtype, **kw)


def unet_diffusers_config(unet: ConditionalUNet, cross_attention_dim: int) -> dict:
  """The UNet2DConditionModel config of our ConditionalUNet (the inverse of unet_from_config)."""
  levels = unet.attention_levels()
  chans = tuple(unet.block_out_channels)
  heads = unet.num_heads or [c // (unet.head_dim or c) for c in chans]
  if not unet.mid_attention:
    raise errors.ConfigError('UNet2DConditionModel always has mid-block attention; this U-Net '
                             'has none (model.mid_attention=False).')
  return dict(
      sample_size=unet.sample_size, in_channels=unet.in_channels, out_channels=unet.out_channels,
      block_out_channels=chans, layers_per_block=unet.layers_per_block,
      down_block_types=tuple('CrossAttnDownBlock2D' if a else 'DownBlock2D' for a in levels),
      up_block_types=tuple('CrossAttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(levels)),
      mid_block_type='UNetMidBlock2DCrossAttn', norm_num_groups=unet.norm_groups,
      norm_eps=unet.norm_eps, cross_attention_dim=cross_attention_dim, attention_head_dim=heads,
      use_linear_projection=unet.linear_projection,
      transformer_layers_per_block=unet.transformer_depth)


def save_unet(folder: str | Path, unet: ConditionalUNet, params, cross_attention_dim: int) -> Path:
  """Writes a UNet2DConditionModel folder (from_pretrained opens it) of our U-Net."""
  return convert.save_diffusers_folder(folder, 'UNet2DConditionModel',
                                       unet_diffusers_config(unet, cross_attention_dim), params)


def save_vae(folder: str | Path, vae: autoencoder.AutoencoderKL, params,
             scaling_factor: float) -> Path:
  """Writes an AutoencoderKL folder (from_pretrained opens it) of our autoencoder."""
  config = dict(autoencoder.diffusers_config(vae), scaling_factor=float(scaling_factor))
  return convert.save_diffusers_folder(folder, 'AutoencoderKL', config, params)


def schedule_from_config(cfg: dict) -> tuple[schedules.Schedule, dict]:
  """(Schedule, sampler options) of a diffusers scheduler_config.json."""
  T = cfg.get('num_train_timesteps', 1000)
  start, end = cfg.get('beta_start', 0.0001), cfg.get('beta_end', 0.02)
  kind = cfg.get('beta_schedule', 'linear')
  if cfg.get('trained_betas') is not None:
    betas = np.asarray(cfg['trained_betas'], np.float64)
  elif kind == 'scaled_linear':
    betas = schedules.scaled_linear_betas(T, start, end)
  elif kind == 'linear':
    betas = np.linspace(start, end, T, dtype=np.float64)
  elif kind == 'squaredcos_cap_v2':
    betas = schedules.get_betas('cosine', T)
  else:
    raise errors.ConfigError(f'scheduler beta_schedule={kind!r} is not supported.')
  prediction = cfg.get('prediction_type', 'epsilon')
  if prediction not in PREDICTIONS:
    raise errors.ConfigError(f'scheduler prediction_type={prediction!r} is not supported.')
  schedule = schedules.from_betas(betas)
  options = dict(prediction=PREDICTIONS[prediction],
                 spacing=cfg.get('timestep_spacing', 'leading'),
                 steps_offset=cfg.get('steps_offset', 0),
                 clip_x0=bool(cfg.get('clip_sample', False)),
                 final_alpha_cumprod=1.0 if cfg.get('set_alpha_to_one', True)
                 else float(schedule.alphas_cumprod[0]))
  return schedule, options


def _refuse_single_file(path: Path) -> None:
  """A one-line error for the original single-file checkpoints (a .ckpt, or a folder of them)."""
  if path.is_file():
    single = path if path.suffix in SINGLE_FILE else None
    if single is None:
      raise errors.ConfigError(f'{path} is a file; pipeline must name a diffusers pipeline '
                               'folder (the one holding model_index.json).')
  elif (path / 'model_index.json').is_file() or (path / 'config.json').is_file():
    return  # A pipeline folder (or one component of it: read_json names what is missing).
  else:
    single = next((p for p in sorted(path.glob('*')) if p.suffix in SINGLE_FILE), None)
  if single is not None:
    raise errors.ConfigError(
        f'{single} is a single-file checkpoint (the original Stable Diffusion format); this '
        'loader reads diffusers pipeline folders. Convert it once with diffusers: '
        'StableDiffusionPipeline.from_single_file(FILE).save_pretrained(DIR) (or its script '
        'scripts/convert_original_stable_diffusion_to_diffusers.py --checkpoint_path FILE '
        '--dump_path DIR), then pass DIR.')


def load(folder: str | Path, dtype=jnp.float32, mesh=None) -> Pipeline:
  """Every part of a diffusers Stable Diffusion pipeline folder, as our modules.

  `dtype` is the weights' and the computation's (bfloat16: attention logits, softmax and
  the samplers' arithmetic stay float32, as diffusers' upcast_attention).

  The weights are placed on `mesh` (default: this process's devices, config-free) by the
  training seam's rules (common.mesh.state_shardings): with mesh.fsdp > 1 each device holds
  its share of every large array, so a pipeline larger than one device fits.
  """
  folder = Path(folder)
  _refuse_single_file(folder)
  index = read_json(folder / 'model_index.json')
  for part in PARTS:
    if part not in index:
      raise errors.ConfigError(f'{folder}/model_index.json has no {part!r}: not a Stable '
                               'Diffusion pipeline.')
  # Every config is read and checked before any weights are; `save` writes them back.
  configs = {'model_index': index, 'unet': read_json(folder / 'unet' / 'config.json'),
             'vae': read_json(folder / 'vae' / 'config.json'),
             'text_encoder': read_json(folder / 'text_encoder' / 'config.json'),
             'scheduler': read_json(folder / 'scheduler' / 'scheduler_config.json')}
  unet = unet_from_config(configs['unet'], dtype)
  autoencoder.from_diffusers_config(configs['vae'], dtype, str(folder / 'vae' / 'config.json'))
  clip.from_config(configs['text_encoder'], dtype)
  schedule, options = schedule_from_config(configs['scheduler'])
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
  if pipe.configs is None:
    raise errors.ConfigError('Only a pipeline made by pipeline.load (it keeps the folder\'s '
                             'configs) can be saved as one.')
  if pipe.text_encoder.added_tokens and pipe.tokenizer.base_size != pipe.tokenizer.table_size:
    raise errors.ConfigError('The tokenizer has fewer tokens than the text encoder\'s table, so '
                             'added tokens would get other ids in transformers.')
  tmp = folder.with_name(folder.name + '.tmp')
  if tmp.exists():
    shutil.rmtree(tmp)  # A save that was killed.
  # The folder's own configs (every key, e.g. upcast_attention), with our weights.
  own = lambda part: {k: v for k, v in pipe.configs[part].items() if not k.startswith('_')}
  convert.save_diffusers_folder(tmp / 'unet', 'UNet2DConditionModel', own('unet'),
                                pipe.unet_params)
  convert.save_diffusers_folder(tmp / 'vae', 'AutoencoderKL',
                                dict(own('vae'), scaling_factor=pipe.scaling_factor),
                                pipe.vae_params)
  clip.save(tmp / 'text_encoder', pipe.text_encoder, pipe.text_params,
            pipe.configs['text_encoder'])
  pipe.tokenizer.tokenizer.save_pretrained(str(tmp / 'tokenizer'))
  (tmp / 'scheduler').mkdir()
  (tmp / 'scheduler' / 'scheduler_config.json').write_text(
      json.dumps(pipe.configs['scheduler'], indent=2) + '\n')
  # Parts not written here (a safety checker) are left out of the index.
  index = {k: v for k, v in pipe.configs['model_index'].items()
           if k.startswith('_') or not isinstance(v, list) or k in PARTS}
  index.update(safety_checker=[None, None], feature_extractor=[None, None],
               requires_safety_checker=False)
  (tmp / 'model_index.json').write_text(json.dumps(index, indent=2) + '\n')
  tmp.rename(folder)
  return folder


def with_embeddings(pipe: Pipeline, paths) -> Pipeline:
  """`pipe` with the tokens of textual-inversion files (diffusers' learned_embeds layout)
  added to its tokenizer and their rows to its text encoder."""
  from latent import embeddings  # pylint: disable=g-import-not-at-top
  paths = [paths] if isinstance(paths, str) else list(paths)
  if not paths:
    return pipe
  params, tokenizer = embeddings.apply_files({'encoder': pipe.text_params}, pipe.tokenizer, paths)
  encoder = pipe.text_encoder.clone(
      added_tokens=tokenizer.vocab_size - pipe.text_encoder.vocab_size)
  return dataclasses.replace(pipe, text_encoder=encoder, text_params=params['encoder'],
                             tokenizer=tokenizer)


def encode_prompts(pipe: Pipeline, prompts: list[str]) -> jnp.ndarray:
  """Prompts -> CLIP hidden states [B, max_length, D] (no attention mask, as SD's pipelines)."""
  ids, _ = pipe.tokenizer(prompts)
  return pipe.text_encoder.apply({'params': pipe.text_params}, jnp.asarray(ids))


def sampler_options(pipe: Pipeline, sampler: str) -> dict:
  """The folder's scheduler settings as `samplers.sample` keywords for `sampler`."""
  options = dict(pipe.sampler_options)
  if sampler not in ('ddim', 'ddpm'):
    options.pop('final_alpha_cumprod')  # Only DDIM's last step has it.
  return options


def make_sample_fn(pipe: Pipeline, sampler: str = 'ddim', num_steps: int = 50, eta: float = 0.0,
                   karras: bool = False, strength: float = 1.0, inpaint: bool = False,
                   controlnet: tuple | None = None, guess_mode: bool = False):
  """jit(fn(noise, context, negative_context, guidance_scale, rng, init_z0=None, keep=None,
  masked_z0=None, control=None, control_scale=1.0) -> (images in [-1, 1], the final
  latents)): SD's text-to-image with classifier-free guidance.

  As diffusers' img2img and inpainting pipelines: `init_z0` (scaled latents of a picture)
  starts the last int(strength * num_steps) steps from the picture noised with `noise`;
  with `inpaint`, latents where `keep` [B, h, w, 1] is 1 are re-imposed from init_z0,
  noised with that same noise, after every step. An inpainting U-Net (9 input channels,
  SD-inpainting) instead sees the mask and `masked_z0` (encode_images(..., keep): the
  picture with the repainted region grey) beside x_t, at any strength.

  `controlnet` = (latent.controlnet.ControlNet, its params) steers the U-Net with the
  `control` images [B, H, W, C] in [0, 1] at `control_scale`, as diffusers'
  StableDiffusionControlNetPipeline; in `guess_mode` its residuals are scaled as diffusers'
  guess mode and reach the conditional half of guidance's batch only.
  """
  options = sampler_options(pipe, sampler)
  channels = pipe.vae.latent_channels
  mask_channels = pipe.unet.in_channels - channels  # 0, or 1 + channels for inpainting U-Nets.
  if mask_channels not in (0, 1 + channels):
    raise errors.ConfigError(f'unet in_channels={pipe.unet.in_channels}: expected '
                             f'{channels} or {2 * channels + 1} (an inpainting U-Net).')
  if mask_channels and not inpaint:
    raise errors.ConfigError('This pipeline\'s U-Net is an inpainting model (9 input channels): '
                             'give sample.init_image and sample.mask.')

  if controlnet is not None and mask_channels:
    raise errors.ConfigError('A ControlNet steers an SD U-Net with 4 input channels; this one is '
                             'an inpainting U-Net.')

  def sample_fn(noise, context, negative, guidance_scale, rng, init_z0=None, keep=None,
                masked_z0=None, control=None, control_scale=1.0):
    def apply(x, t, c, m):
      del m  # SD's U-Net sees every token.
      residuals = None
      if control is not None:  # Guidance's batch is [conditional; unconditional].
        model, params = controlnet
        both, scale = controlnet_lib.for_guidance(control, control_scale, guess_mode)
        residuals = model.apply({'params': params}, x, t, both, c, None, scale, guess_mode)
      return pipe.unet.apply({'params': pipe.unet_params}, x, t, context=c, control=residuals)
    ones = jnp.ones(context.shape[:2], bool)
    model_fn = guidance.guided_model_fn(apply, context, ones, negative, ones, guidance_scale)
    inject = None
    if mask_channels:  # diffusers: [x_t, mask (1 = repaint), latents of the masked picture].
      extra = jnp.concatenate([1.0 - keep, masked_z0], axis=-1)
      unet_fn = model_fn
      model_fn = lambda x, t: unet_fn(jnp.concatenate([x, extra.astype(x.dtype)], -1), t)
    elif inpaint:
      inject = samplers.reimposing(init_z0, keep, noise)
    z0 = samplers.sample(pipe.schedule, model_fn, noise, rng, sampler=sampler,
                         num_steps=num_steps, eta=eta, karras=karras, inject=inject,
                         init_x0=init_z0 if strength < 1.0 else None, strength=strength,
                         **options)
    images = pipe.vae.apply({'params': pipe.vae_params}, z0 / pipe.scaling_factor,
                            method=pipe.vae.decode)
    return images, z0

  return jax.jit(sample_fn)


def encode_images(pipe: Pipeline, images_uint8: np.ndarray, keep: np.ndarray | None = None,
                  batch_size: int = 8) -> np.ndarray:
  """uint8 [N, H, W, 3] -> scaled latents (the posterior mean; diffusers draws from it).

  With `keep` [N, h, w, 1] on the latent grid, the pixels of every patch where it is 0 are
  set to 0 in [-1, 1] first: the masked picture an inpainting U-Net is given.
  """
  f = pipe.vae.downsampling_factor

  @jax.jit
  def encode(images, keep):
    x = images.astype(jnp.float32) / 127.5 - 1.0
    x = x * jnp.repeat(jnp.repeat(keep, f, axis=1), f, axis=2)
    mean, _ = pipe.vae.apply({'params': pipe.vae_params}, x, method=pipe.vae.encode)
    return pipe.scaling_factor * mean

  if keep is None:
    keep = np.ones((len(images_uint8), images_uint8.shape[1] // f, images_uint8.shape[2] // f,
                    1), np.float32)
  return np.concatenate([np.asarray(encode(images_uint8[i:i + batch_size], keep[i:i + batch_size]))
                         for i in range(0, len(images_uint8), batch_size)])


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
  context = encode_prompts(pipe, prompts)
  negative = encode_prompts(pipe, [negative_prompt] * len(prompts))
  as_array = lambda a: None if a is None else jnp.asarray(a)
  images, _ = make_sample_fn(pipe, inpaint=keep is not None, **sampler_kwargs)(
      jnp.asarray(latents), context, negative, jnp.float32(guidance_scale),
      jax.random.PRNGKey(seed + 1), as_array(init_z0), as_array(keep), as_array(masked_z0),
      as_array(control), control_scale)
  return imageio.to_uint8(np.asarray(images))
