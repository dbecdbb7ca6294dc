"""Built-in demo: a small U-Net on scikit-learn's handwritten digits at 16x16, CPU in minutes.

No download: the digits ship inside scikit-learn. Recognisable digits come out
after about 1,500 steps (5 minutes on 2 quiet CPU cores, 9 on busy ones; one XLA CPU device).
"""

from ddpm.configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'digits'
  config.data.image_size = 16

  config.model.block_out_channels = (32, 64)
  config.model.layers_per_block = 1
  config.model.attention_resolutions = (8,)
  config.model.head_dim = 16
  config.model.norm_groups = 8

  config.diffusion.schedule = 'cosine'
  config.diffusion.num_timesteps = 1000

  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 100
  config.optim.lr_schedule = 'cosine'

  config.train.batch_size = 32
  config.train.num_steps = 1500
  config.train.log_every = 100
  config.train.checkpoint_every = 500
  config.train.sample_every = 500
  config.train.num_grid_samples = 36
  config.train.ema_decay = 0.995

  config.sample.num_images = 64
  config.sample.batch_size = 64
  config.sample.num_steps = 50
  return config
