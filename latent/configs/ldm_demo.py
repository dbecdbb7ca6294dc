"""Built-in stage-2 demo: text-conditioned latent diffusion on the digits, CPU in minutes.

Measured on 2 CPU cores: 2,000 steps at 2.2 (busy) to 4 (quiet) steps/s, 10 to 19 minutes
with compilation;
every prompt "digit zero" ... "digit nine" then gives its digit.

Prompts are "digit seven" and the like (the captions the digits source gives).
Train stage 1 first, into the workdir named by vae_workdir:

  python -m latent.main --config=latent/configs/vae_demo.py --workdir=runs/vae_demo
  python -m latent.main --config=latent/configs/ldm_demo.py --workdir=runs/ldm_demo
  python -m latent.main --config=latent/configs/ldm_demo.py --workdir=runs/ldm_demo --mode=sample

For class conditioning on the same data: --config.conditioning.kind=class.
"""

from common import data
from latent.configs import ldm_base


def get_config():
  config = ldm_base.get_config()
  config.vae_workdir = 'runs/vae_demo'
  config.data.source = 'digits'
  config.data.path = ''
  config.data.image_size = 16    # 4x4x4 latents with vae_demo's factor 4.

  c = config.conditioning
  c.max_length = 4
  c.width = 64
  c.layers = 1
  c.heads = 2
  c.class_names = data.DIGIT_NAMES
  c.class_scope = ''

  m = config.model
  m.block_out_channels = (64, 128)
  m.layers_per_block = 1
  m.attention_resolutions = (4, 2)
  m.head_dim = 32
  m.norm_groups = 16

  config.diffusion.schedule = 'cosine'
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.lr_schedule = 'cosine'

  t = config.train
  t.batch_size = 64
  t.num_steps = 2_000
  t.log_every = 100
  t.checkpoint_every = 500
  t.sample_every = 500
  t.ema_decay = 0.995
  t.hflip = False                # Mirrored digits are not digits.
  t.grid_prompts = tuple(f'digit {n}' for n in data.DIGIT_NAMES)
  t.num_grid_samples = 60

  s = config.sample
  s.prompts = ('digit three', 'digit seven')
  s.guidance_scale = 3.0
  s.num_per_prompt = 8
  s.batch_size = 64
  return config
