"""Every key of a fine-tuning run (stage 'finetune'): teach a trained text LDM a concept.

  python -m latent.main --config=latent/configs/finetune_lora.py --workdir=runs/ft_lora \
      --config.base_workdir=runs/ldm_text --config.data.path=my_concept_images \
      --config.concept.token=sks --config.concept.class_prompt=hair

The base is a stage-2 text LDM workdir; its architecture (model, conditioning,
diffusion, vae_workdir and data.image_size) is read from its config.json, so those
keys are not in this config. Or it is a Stable Diffusion pipeline folder
(--config.pipeline=DIR): its scheduler gives the prediction type and its U-Net the
image size. `method` picks what trains (latent/finetune/experiment.py):

  lora               low-rank adapters on the U-Net's attention projections (lora.*)
  dreambooth         the whole U-Net (and with finetune.train_text_encoder the text encoder),
                     optionally with prior preservation (finetune.prior_preservation)
  textual_inversion  one new embedding row for concept.token, initialised from concept.init_word
  hypernetwork       residual MLPs on the cross-attention context (hypernetwork.*)
  controlnet         a ControlNet (controlnet.*): a trainable copy of the U-Net's encoder
                     steered by control maps (Canny edges, scribbles) made from data.path's
                     images, captioned by data.captions (or the digits' captions; else
                     the empty prompt); concept.* is unused. Sampling takes
                     sample.control_image (pictures, or maps with sample.control_is_map).

Every concept image is captioned with concept.instance_prompt ('' = "<token> <class_prompt>").
A token the base's vocabulary lacks is added to it (its row: the init word's, else random);
a pipeline's CLIP reads any word as BPE pieces, so there only textual inversion adds one.
"""

import ml_collections

from common import config as config_lib
from latent.configs import ldm_base

METHODS = ('lora', 'dreambooth', 'textual_inversion', 'hypernetwork', 'controlnet')
# Keys taken from the base workdir's config.json (the architecture being fine-tuned).
FROM_BASE = ('model', 'conditioning', 'diffusion', 'vae_workdir')
RUN_KEYS = ('base_workdir', 'pipeline', 'method', 'concept.token', 'concept.init_word', 'lora.rank',
            'lora.alpha',  # Its scale is in the checkpoint: another one would be ignored.
            'lora.targets', 'hypernetwork.multipliers', 'finetune.train_text_encoder',
            'controlnet.detector', 'controlnet.embedding_channels')


def get_config() -> ml_collections.ConfigDict:
  config = ldm_base.get_config()
  for key in FROM_BASE:
    del config[key]
  config.stage = 'finetune'
  config.base_workdir = ''         # The stage-2 text LDM to fine-tune, or ...
  config.pipeline = ''             # ... a Stable Diffusion pipeline folder (diffusers' layout).
  config.method = 'lora'
  config.data.path = ''            # The concept's images (3-20 are typical).
  config.data.captions = ''        # Unused (every image gets concept.instance_prompt), but by
                                   # controlnet: '' = data.path's captions.tsv if there is one.

  config.concept = c = ml_collections.ConfigDict()
  c.token = 'sks'                  # The word the concept is taught as.
  c.class_prompt = 'hair'          # What the concept is an instance of, e.g. 'hair' or
                                   # 'long hair'; DreamBooth's prior images use it alone.
  c.instance_prompt = ''           # '' = '<token> <class_prompt>'.
  c.init_word = ''                 # A new token's initial row: this word's (textual inversion
                                   # needs one); '' = a random row of the table's scale.

  config.finetune = f = ml_collections.ConfigDict()
  f.prior_preservation = False     # DreamBooth: also fit the base's own class_prompt images ...
  f.num_class_images = 64          # ... this many, generated once into WORKDIR/class_images,
  f.prior_loss_weight = 1.0        # ... their loss weighted by this.
  f.train_text_encoder = False     # DreamBooth: the text encoder trains too.
  f.unrelated_prompts = ('blonde long hair and blue eyes', 'black short hair and red eyes')
                                   # Shown beside the concept in the grids (drift).

  config.lora = l = ml_collections.ConfigDict()
  l.rank = 4
  l.alpha = 0.0                    # Scale alpha / rank; 0 = rank (scale 1).
  l.targets = r'unet/.*/(to_q|to_k|to_v|to_out_0)'  # Regex over module paths.

  config.hypernetwork = h = ml_collections.ConfigDict()
  h.multipliers = (1, 2, 1)        # Layer widths in units of the context width.

  config.controlnet = n = ldm_base.control_config()
  n.embedding_channels = ldm_base.SD_EMBEDDING_CHANNELS  # The conditioning embedding's widths: one
                                   # stride-2 stage per entry after the first, so
                                   # 2 ** (len - 1) must be the VAE's factor (SD's 8).
  n.drop_prompt = 0.5              # Prompts dropped to the null context while training (the
                                   # paper's 50%: the ControlNet learns to read the map alone).

  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 0
  config.optim.lr_schedule = 'constant'
  t = config.train
  t.latent_cache = True            # The concept's (and class images') posterior moments, once
                                   # into the workdir; False encodes the images every step.
  t.batch_size = 4
  t.num_steps = 400
  t.log_every = 20
  t.checkpoint_every = 200
  t.sample_every = 200
  t.ema_decay = 0.0                # EMA off: the artefacts and samples use the raw weights
  config.sample.use_ema = False    # (set both to use an EMA).
  t.grid_prompts = ()              # Set from the concept + finetune.unrelated_prompts.
  config.sample.prompts = ()        # () = the instance prompt.
  return config


def instance_prompt(config) -> str:
  c = config.concept
  return c.instance_prompt or f'{c.token} {c.class_prompt}'.strip()


def validate(config: ml_collections.ConfigDict) -> None:
  """The fine-tuning keys; the LDM keys once the base's are merged in (latent.finetune.experiment)."""
  config_lib.check_keys(config, get_config_with_base())
  config_lib.check_choice(config.stage, ('finetune',), 'stage')
  config_lib.check_choice(config.method, METHODS, 'method')
  if bool(config.base_workdir) == bool(config.pipeline):
    raise ValueError('Name the model to fine-tune with exactly one of base_workdir (a text LDM '
                     'trained here) and pipeline (a Stable Diffusion pipeline folder).')
  if not config.data.path and not (config.method == 'controlnet' and
                                   config.data.source == 'digits'):
    raise ValueError('data.path must name the folder of concept images.')
  validate_controlnet(config)
  c = config.concept
  if not c.token or c.token.strip().lower() != c.token or ' ' in c.token:
    raise ValueError(f'concept.token={c.token!r} must be one lower-case word, e.g. sks.')
  if config.method == 'textual_inversion' and not c.init_word:
    raise ValueError("concept.init_word must name a word of the base's vocabulary for "
                     "textual inversion (e.g. 'green' or 'hair').")
  if c.token not in instance_prompt(config).split():
    raise ValueError(f'concept.instance_prompt={c.instance_prompt!r} must contain '
                     f'concept.token={c.token!r}.')
  f = config.finetune
  if f.prior_preservation:
    if config.method != 'dreambooth':
      raise ValueError('finetune.prior_preservation is DreamBooth\'s: set method=dreambooth.')
    if not c.class_prompt:
      raise ValueError('finetune.prior_preservation needs concept.class_prompt (the prompt of '
                       'the class images, e.g. "hair").')
    config_lib.check_positive(f.num_class_images, 'finetune.num_class_images')
    config_lib.check_positive(f.prior_loss_weight, 'finetune.prior_loss_weight', allow_zero=True)
  if f.train_text_encoder and config.method != 'dreambooth':
    raise ValueError('finetune.train_text_encoder applies to method=dreambooth.')
  m = tuple(config.hypernetwork.multipliers)
  if len(m) < 2 or m[0] != 1 or m[-1] != 1 or min(m) <= 0:
    raise ValueError(f'hypernetwork.multipliers={m} must be positive and start and end with 1, '
                     'e.g. (1, 2, 1).')
  config_lib.check_positive(config.lora.rank, 'lora.rank')
  config_lib.check_positive(config.lora.alpha, 'lora.alpha', allow_zero=True)
  if 'model' in config:
    ldm_base.validate_values(config)


def validate_controlnet(config) -> None:
  n, s = config.controlnet, config.sample
  ldm_base.validate_control(n, s)
  if not n.embedding_channels or min(n.embedding_channels) <= 0:
    raise ValueError(f'controlnet.embedding_channels={tuple(n.embedding_channels)} must be '
                     f'positive widths, e.g. {ldm_base.SD_EMBEDDING_CHANNELS}.')
  config_lib.check_range(n.drop_prompt, 0.0, 1.0, 'controlnet.drop_prompt')
  if config.method != 'controlnet' and s.control_image:
    raise ValueError('sample.control_image steers a ControlNet: this run\'s method is '
                     f'{config.method!r}.')


def get_config_with_base() -> ml_collections.ConfigDict:
  """The keys a resolved fine-tuning config may hold: these and the base's architecture."""
  config = get_config()
  base = ldm_base.get_config()
  for key in FROM_BASE:
    config[key] = base[key]
  return config
