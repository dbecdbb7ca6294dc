"""A tiny StyleGAN2 that trains in a few minutes on CPU, on built-in digits (no download).

python -m stylegan.main --config=stylegan/configs/demo.py --workdir=runs/sgdemo

The recipe follows stylegan2-ada-pytorch's small-image ('cifar') configuration
where it matters for a short run: no path-length regularisation or style mixing,
and a minibatch-stddev group as large as the batch. With the reference's group of
4 the generator spends its first ~40k images collapsed on one shape before it
diversifies (measured: diversity 0.31 of the data's at 24k images, 0.94 at 48k);
with a group of 16, D sees each batch's spread and the samples stay varied
(0.77 at 24k images). See benchmarks/RESULTS.md.
"""

from stylegan.configs import base


def get_config():
  c = base.get_config()
  c.data.source = 'digits'
  c.data.image_size = 32
  c.model.resolution = 32
  c.model.z_dim = 64
  c.model.w_dim = 64
  c.model.mapping_layers = 2
  c.model.channel_base = 512      # 16 channels at 32x32 up to 64 at 8x8 and 4x4.
  c.model.channel_max = 64
  c.model.mbstd_group_size = 16   # The whole batch: D sees a collapse at once.
  c.loss.r1_gamma = 0.1
  c.loss.pl_weight = 0.0          # As the reference's small-image config.
  c.loss.style_mixing_prob = 0.0
  c.train.batch_size = 16
  c.train.num_steps = 2000
  c.train.ema_kimg = 0.5
  c.train.log_every = 100
  c.train.sample_every = 250
  c.train.checkpoint_every = 500
  c.train.num_grid_samples = 64
  c.augment.policy = 'translation,cutout'
  c.augment.ada_target = 0.6
  c.augment.ada_kimg = 5          # Fast adaptation for a short run.
  c.sample.batch_size = 64
  return c
