"""The DDPM paper's CIFAR-10 model (Ho et al. 2020, appendix B): 35.7M parameters.

ch=128, ch_mult=(1, 2, 2, 2), 2 res blocks per level, attention at 16x16,
dropout 0.1, linear betas 1e-4..0.02 over T = 1000, Adam 2e-4 with 5,000
warm-up steps, batch 128, 800k steps, EMA 0.9999, random horizontal flips.
CIFAR-10 comes from TFDS, prepared beforehand (`tfds build cifar10 --data_dir=DIR`):

  python -m ddpm.main --config=ddpm/configs/cifar10.py --workdir=runs/cifar10 \
      --config.data.tfds_data_dir=DIR
"""

from ddpm.configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'tfds'
  config.data.tfds_name = 'cifar10'
  config.data.image_size = 32

  config.augment.enabled = True
  config.augment.rotation_degrees = 0.0
  config.augment.brightness = 0.0
  config.augment.contrast = 0.0

  config.model.block_out_channels = (128, 256, 256, 256)
  config.model.layers_per_block = 2
  config.model.attention_resolutions = (16,)
  config.model.head_dim = 0
  config.model.dropout = 0.1

  config.diffusion.schedule = 'linear'
  config.diffusion.num_timesteps = 1000

  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 5000
  config.optim.grad_clip_norm = 1.0

  config.train.batch_size = 128
  config.train.num_steps = 800_000
  config.train.ema_decay = 0.9999
  return config
