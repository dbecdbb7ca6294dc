"""Built-in ControlNet demo: digits drawn to follow Canny edges, CPU in minutes.

The base is ldm_demo.py's text LDM on the digits (train it first, see there); the
ControlNet learns from the edge maps of the same digits:

  python -m latent.main --config=latent/configs/controlnet_demo.py --workdir=runs/cn_demo
  python -m latent.main --config=latent/configs/controlnet_demo.py --workdir=runs/cn_demo \
      --mode=sample --config.sample.control_image=DIGIT_PICTURES

`python benchmarks/bench_controlnet.py` measures how well the samples follow their maps.
"""

from latent.configs import finetune_base


def get_config():
  config = finetune_base.get_config()
  config.method = 'controlnet'
  config.base_workdir = 'runs/ldm_demo'
  config.data.source = 'digits'
  config.data.path = ''
  config.data.max_images = 1_500  # The other 297 digits are bench_controlnet.py's held-out set.
  n = config.controlnet
  n.detector = 'canny'
  n.embedding_channels = (16, 32, 64)  # 2 ** 2 = vae_demo's factor 4.
  config.optim.learning_rate = 5e-4
  config.optim.warmup_steps = 100
  t = config.train
  t.hflip = False                 # Mirrored digits are not digits.
  t.batch_size = 64
  t.num_steps = 1_500
  t.log_every = 100
  t.checkpoint_every = 500
  t.sample_every = 500
  t.num_grid_samples = 16
  s = config.sample
  s.batch_size = 64
  s.guidance_scale = 3.0
  s.prompts = ('',)
  return config
