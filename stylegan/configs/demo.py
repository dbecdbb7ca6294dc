"""A tiny StyleGAN2 that trains in a few minutes on CPU, on built-in digits (no download).

python -m stylegan.main --config=stylegan/configs/demo.py --workdir=/tmp/sg_demo
"""

from stylegan import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.source = 'digits'
  c.data.image_size = 32
  c.model.resolution = 32
  c.model.z_dim = 64
  c.model.w_dim = 64
  c.model.mapping_layers = 2
  c.model.channel_base = 512      # 16 channels at 32x32 up to 64 at 8x8 and 4x4.
  c.model.channel_max = 64
  c.loss.r1_gamma = 0.1
  c.train.batch_size = 16
  c.train.num_steps = 600
  c.train.ema_kimg = 0.5
  c.train.log_every = 50
  c.train.sample_every = 200
  c.train.checkpoint_every = 200
  c.train.num_grid_samples = 16
  c.augment.policy = 'translation,cutout'
  c.augment.ada_target = 0.6
  c.augment.ada_kimg = 5          # Fast adaptation for a short run.
  c.sample.batch_size = 16
  return c
