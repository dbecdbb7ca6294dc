"""Stable Diffusion pipeline folders (diffusers' layout): text-to-image, image-to-image and
inpainting. Every key + validate.

  python -m latent.main --config=latent/configs/sd_pipeline.py --workdir=OUT_DIR \
      --config.pipeline=/path/to/stable-diffusion-v1-5 --mode=sample \
      --config.sample.prompts="('a watercolor fox',)" --config.sample.negative_prompt=blurry

The folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) is read
by latent.sd.pipeline; its scheduler_config.json gives the betas, prediction type and timestep
settings. Images go to OUT_DIR/samples/1.jpg ... with captions.tsv and a captioned grid.
Add --config.sample.init_image=PICTURE_OR_FOLDER (and --config.sample.strength) for
image-to-image, and --config.sample.mask=MASK (white = generate) for inpainting; an
inpainting U-Net (SD-inpainting, 9 input channels) needs both. A ControlNet
(--config.controlnet.folder=DIR, a diffusers ControlNetModel folder such as
lllyasviel/sd-controlnet-canny, or WORKDIR/controlnet of a ControlNet run here) steers
sampling with --config.sample.control_image=PICTURE_OR_FOLDER: pictures made into maps with
controlnet.detector, or maps as they are with --config.sample.control_is_map=True.
"""

import ml_collections

from common import config as config_lib
from ddpm.configs import default as ddpm_default
from latent.configs import ldm_base

DTYPES = ('float32', 'bfloat16')


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.stage = 'pipeline'        # latent.main dispatches on this.
  config.pipeline = ''             # The pipeline folder (StableDiffusionPipeline.save_pretrained).
  config.dtype = 'float32'         # Compute dtype of the U-Net, VAE and text encoder.
  config.cpu_devices = 0

  config.controlnet = n = ldm_base.control_config()
  n.folder = ''                    # A diffusers ControlNetModel folder for this pipeline's U-Net.

  config.sample = s = ml_collections.ConfigDict()
  s.prompts = ('a photo of an astronaut riding a horse on mars',)
  s.prompt_file = ''               # One prompt per line; replaces sample.prompts.
  s.negative_prompt = ''           # The unconditional context of classifier-free guidance.
  s.num_per_prompt = 4
  s.guidance_scale = 7.5
  s.sampler = 'dpmpp_2m_karras'
  s.num_steps = 25
  s.eta = 0.0                      # ddim only.
  s.karras_sigmas = False          # euler / heun.
  s.batch_size = 4
  s.init_image = ''                # Image-to-image: a picture (or folder) to start from ...
  s.strength = 0.8                 # ... noised this far (diffusers' img2img default; 1 = ignore it).
  s.mask = ''                      # Inpainting: white = generate, black = keep init_image.
  ldm_base.add_control_sample_keys(s)  # control_image (cycled over the images), ...
  s.adapters = ()                  # LoRA files (PEFT/diffusers keys, e.g. from
                                   # finetune_lora.py on this pipeline) as 'PATH[:STRENGTH]'.
  s.embeddings = ()                # Textual-inversion files (learned_embeds.safetensors, ours
                                   # or diffusers'): their tokens join the vocabulary.
  s.output_dir = ''                # '' = WORKDIR/samples.
  s.seed = 1
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  config_lib.check_keys(config, get_config())
  config_lib.check_choice(config.stage, ('pipeline',), 'stage')
  if not config.pipeline:
    raise ValueError('pipeline must name a Stable Diffusion pipeline folder '
                     '(--config.pipeline=/path/to/folder with model_index.json).')
  config_lib.check_choice(config.dtype, DTYPES, 'dtype')
  s = config.sample
  config_lib.check_choice(s.sampler, ddpm_default.SAMPLERS, 'sample.sampler')
  if s.sampler == 'ddpm':
    raise ValueError("sample.sampler='ddpm' runs all 1000 steps; pick ddim or a faster one.")
  if s.karras_sigmas and s.sampler not in ('euler', 'heun'):
    raise ValueError('sample.karras_sigmas applies to the euler and heun samplers.')
  config_lib.check_range(s.num_steps, 1, 1000, 'sample.num_steps')
  config_lib.check_range(s.eta, 0.0, 1.0, 'sample.eta')
  config_lib.check_positive(s.guidance_scale, 'sample.guidance_scale', allow_zero=True)
  for key in ('num_per_prompt', 'batch_size'):
    config_lib.check_positive(s[key], f'sample.{key}')
  config_lib.check_range(s.strength, 0.0, 1.0, 'sample.strength')
  if s.mask and not s.init_image:
    raise ValueError('sample.mask (inpainting) needs sample.init_image, the picture to complete.')
  # Every input file exists before the pipeline's weights are read.
  for i, spec in enumerate(s.adapters):
    config_lib.check_exists(config_lib.parse_weighted_path(spec, f'sample.adapters[{i}]')[0],
                            f'sample.adapters[{i}]')
  embeddings = [s.embeddings] if isinstance(s.embeddings, str) else list(s.embeddings)
  for i, path in enumerate(embeddings):
    config_lib.check_exists(path, f'sample.embeddings[{i}]')
  if s.init_image:
    config_lib.check_exists(s.init_image, 'sample.init_image', folder_ok=True)
  if s.mask:
    config_lib.check_exists(s.mask, 'sample.mask')
  n = config.controlnet
  ldm_base.validate_control(n, s)
  if bool(n.folder) != bool(s.control_image):
    raise ValueError('controlnet.folder and sample.control_image go together: the ControlNet '
                     'and the pictures (or maps) that steer it.')
  if n.folder:
    config_lib.check_exists(n.folder, 'controlnet.folder', folder_ok=True)
  if not (s.prompts or s.prompt_file):
    raise ValueError('sample.prompts (or sample.prompt_file) must give at least one prompt.')
