"""ML2023 HW6 strong baseline: 64x64 anime faces from an image folder.

Cosine schedule, T = 1000, the medium baseline's augmentation, and a U-Net of
about 30M parameters with attention at 16x16 and 8x8. Point data.path at the
HW6 `faces` folder:

  python -m ddpm.main --config=ddpm/configs/anime64.py --workdir=runs/anime64 \
      --config.data.path=/path/to/faces
"""

from ddpm.configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'folder'
  config.data.path = 'faces'
  config.data.image_size = 64

  config.augment.enabled = True

  config.model.block_out_channels = (128, 128, 256, 256)
  config.model.layers_per_block = 2
  config.model.attention_resolutions = (16, 8)
  config.model.head_dim = 64
  config.model.dropout = 0.1

  config.diffusion.schedule = 'cosine'
  config.diffusion.num_timesteps = 1000

  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 1000

  config.train.batch_size = 128
  config.train.num_steps = 100_000
  config.train.ema_decay = 0.9995

  config.sample.num_images = 1000
  config.sample.num_steps = 100
  return config
