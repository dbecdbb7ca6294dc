"""Every key a stage-2 (latent diffusion) config may set, with defaults.

The U-Net, diffusion, optimiser, training and sampler blocks are ddpm's (same
keys, same checks); stage 2 adds the VAE to train on, the conditioning and
classifier-free guidance. `validate` runs before any compute and names the key.
"""

import ml_collections

from common import config as config_lib
from ddpm.configs import default as ddpm_default

CONDITIONING = ('text', 'class')

# Settings a run's checkpoints depend on (common.loop.check_workdir): ddpm's, plus the
# conditioning network and the autoencoder whose latents it models.
RUN_KEYS = ddpm_default.RUN_KEYS + (
    'model.transformer_depth', 'vae_workdir', 'conditioning.kind', 'conditioning.max_length',
    'conditioning.min_word_count', 'conditioning.width', 'conditioning.layers',
    'conditioning.heads', 'conditioning.class_names', 'conditioning.class_scope')


def get_config() -> ml_collections.ConfigDict:
  config = ddpm_default.get_config()
  config.stage = 'ldm'
  config.vae_workdir = ''          # The stage-1 workdir (latent/configs/vae_*.py) to train on.
  config.data.source = 'folder'
  config.data.path = '../shared/data/anime_faces_mlds96_tagged/images'
  config.data.image_size = 64
  del config['augment']             # Only flips (train.hflip): captions name colours, not sides.

  config.conditioning = c = ml_collections.ConfigDict()
  c.kind = 'text'                  # 'text': captions through the tokenizer + TextEncoder;
                                   # 'class': one class name per image (class_names).
  c.max_length = 16                # Tokens per caption; longer prompts are truncated (warning).
  c.min_word_count = 1             # Vocabulary: caption words seen at least this often.
  c.width = 256                    # Context width D (the U-Net's cross_attention_dim).
  c.layers = 2                     # Text encoder depth and heads.
  c.heads = 4
  c.class_names = ('blonde', 'brown', 'black', 'blue', 'red', 'purple', 'green', 'pink',
                   'aqua', 'yellow', 'gray', 'white', 'orange')
  c.class_scope = 'hair'           # A caption's class: the one class name before this word
                                   # (its hair colour); '' = anywhere in the caption.
  c.dropout_prob = 0.1             # Classifier-free guidance: P(context -> learned null).

  m = config.model
  m.block_out_channels = (128, 256, 256)
  m.attention_resolutions = (16, 8)
  m.head_dim = 32
  m.transformer_depth = 1

  config.diffusion.schedule = 'scaled_linear'  # Stable Diffusion's schedule for latents.
  config.sample.clip_x0 = False    # Latents are not bounded to [-1, 1].

  t = config.train
  t.latent_cache = True            # Encode the data set once (posterior mean and std, in the
                                   # workdir) instead of running the VAE encoder every step.
  t.hflip = True                   # Random horizontal flips (the cache holds both orientations).
  t.grid_prompts = ('blonde long hair and blue eyes', 'red short hair and green eyes',
                    'black hair and red eyes', 'pink long hair and purple eyes')

  s = config.sample
  del s['num_images'], s['progressive']
  s.guidance_scale = 4.0           # 1 = conditional model only, 0 = unconditional.
  s.prompts = ('blonde long hair and blue eyes',)
  s.prompt_file = ''               # One prompt per line; replaces sample.prompts.
  s.num_per_prompt = 8
  s.init_image = ''                # Image-to-image: a picture (or folder) to start from ...
  s.strength = 0.6                 # ... noised this far (0 = VAE reconstruction, 1 = ignore it).
  s.mask = ''                      # Inpainting: white = generate, black = keep init_image.
  s.embeddings = ()                # Textual-inversion files (learned_embeds.safetensors): their
                                   # tokens join the vocabulary.
  s.hypernetwork = ''              # A hypernetwork file as 'PATH[:STRENGTH]'.
  add_control_sample_keys(s)       # A ControlNet run's (finetune_base.py, method=controlnet).
  return config


# ---- ControlNet keys (finetune_base.py's method=controlnet, sd_pipeline.py) ----------------

DETECTORS = ('canny', 'scribble')  # latent.controlnet.maps.control_maps.
SD_EMBEDDING_CHANNELS = (16, 32, 96, 256)  # diffusers' ControlNet embedding (VAE factor 8).


def control_config() -> ml_collections.ConfigDict:
  """How control maps are made from pictures (training data, sample.control_image): the
  `controlnet` keys shared with sd_pipeline.py."""
  n = ml_collections.ConfigDict()
  n.detector = 'canny'             # canny, scribble (latent.controlnet.maps.control_maps).
  n.low_threshold = 100            # Canny's hysteresis thresholds (both detectors).
  n.high_threshold = 200
  n.thickness = 0                  # Scribble stroke half-width in pixels (0 = side / 64).
  return n


def add_control_sample_keys(s: ml_collections.ConfigDict) -> None:
  s.control_image = ''             # A picture or folder to steer sampling with (ControlNet), ...
  s.control_is_map = False         # ... already a control map (else controlnet.detector's).
  s.control_scale = 1.0            # diffusers' controlnet_conditioning_scale.
  s.guess_mode = False             # diffusers' guess mode (scaled residuals, conditional only).


def validate_control(n: ml_collections.ConfigDict, s: ml_collections.ConfigDict) -> None:
  """The control-map keys and sample.control_* (also sd_pipeline.py's)."""
  config_lib.check_choice(n.detector, DETECTORS, 'controlnet.detector')
  if not 0 <= n.low_threshold <= n.high_threshold:
    raise ValueError(f'controlnet.low_threshold={n.low_threshold} and high_threshold='
                     f'{n.high_threshold} must satisfy 0 <= low <= high.')
  config_lib.check_positive(n.thickness, 'controlnet.thickness', allow_zero=True)
  config_lib.check_positive(s.control_scale, 'sample.control_scale', allow_zero=True)
  if s.guess_mode and not s.control_image:
    raise ValueError('sample.guess_mode applies to sampling with sample.control_image.')
  if s.control_image:  # Before any weights are read.
    config_lib.check_exists(s.control_image, 'sample.control_image', folder_ok=True)


def validate(config: ml_collections.ConfigDict, vae_factor: int | None = None) -> None:
  """Checks keys and values; with the VAE's downsampling factor, also the latent shapes."""
  config_lib.check_keys(config, get_config())
  config_lib.check_choice(config.stage, ('ldm',), 'stage')
  validate_values(config, vae_factor)


def validate_values(config: ml_collections.ConfigDict, vae_factor: int | None = None) -> None:
  """`validate` without the key check (fine-tuning configs hold more keys)."""
  if not config.vae_workdir:
    raise ValueError('vae_workdir must name the stage-1 workdir (train one with '
                     'python -m latent.main --config=latent/configs/vae_anime.py --workdir=DIR).')
  from common import data, mesh, optim, params  # pylint: disable=g-import-not-at-top
  data.validate(config.data)
  optim.validate(config.optim)
  mesh.validate(config.mesh)
  params.validate(config.params)
  config_lib.check_positive(config.cpu_devices, 'cpu_devices', allow_zero=True)
  c = config.conditioning
  config_lib.check_choice(c.kind, CONDITIONING, 'conditioning.kind')
  for key in ('max_length', 'min_word_count', 'width', 'layers', 'heads'):
    config_lib.check_positive(c[key], f'conditioning.{key}')
  if c.width % c.heads:
    raise ValueError(f'conditioning.heads={c.heads} must divide conditioning.width={c.width}.')
  if c.kind == 'class' and (len(set(c.class_names)) != len(c.class_names) or not c.class_names):
    raise ValueError(f'conditioning.class_names must be distinct and non-empty: {c.class_names}.')
  config_lib.check_range(c.dropout_prob, 0.0, 1.0, 'conditioning.dropout_prob')
  if vae_factor:
    size = config.data.image_size
    if size % vae_factor:
      raise ValueError(f'data.image_size={size} is not divisible by the VAE factor {vae_factor}.')
    ddpm_default.validate_model(config.model, size // vae_factor, 'latent size')
  config_lib.check_positive(config.model.transformer_depth, 'model.transformer_depth')
  ddpm_default.validate_diffusion(config.diffusion)
  ddpm_default.validate_train(config.train)
  ddpm_default.validate_sample(config.sample, config.diffusion)
  s = config.sample
  config_lib.check_positive(s.guidance_scale, 'sample.guidance_scale', allow_zero=True)
  config_lib.check_positive(s.num_per_prompt, 'sample.num_per_prompt')
  config_lib.check_range(s.strength, 0.0, 1.0, 'sample.strength')
  if not (s.prompts or s.prompt_file):
    raise ValueError('sample.prompts (or sample.prompt_file) must give at least one prompt.')
  if s.hypernetwork:
    config_lib.parse_weighted_path(s.hypernetwork, 'sample.hypernetwork')
  if s.mask and not s.init_image:
    raise ValueError('sample.mask (inpainting) needs sample.init_image, the picture to complete.')
  if s.control_image and 'controlnet' not in config:
    raise ValueError('sample.control_image steers a ControlNet: sample a ControlNet run '
                     '(latent/configs/controlnet_*.py) instead.')
