"""StyleGAN2 on 32x32 anime faces, sized for about an hour on 2 CPU cores.

python -m stylegan.main --config=stylegan/configs/anime32.py --workdir=runs/sg_anime32

The getchu faces in ../shared (15.8k, 64x64) downsampled to 32x32. The recipe is
stylegan2-ada-pytorch's small-image ('cifar') one scaled down: no path-length
regularisation or style mixing, a minibatch-stddev group as large as the batch,
gamma 0.01, a 2-layer mapping network; channels are kept small (32 at 32x32) so a step
takes a fraction of a second on a CPU. Measured results: benchmarks/RESULTS.md.
"""

from stylegan.configs import base


def get_config():
  c = base.get_config()
  c.data.source = 'folder'
  c.data.path = '../shared/data/anime_faces_getchu64/images'
  c.data.image_size = 32
  c.model.resolution = 32
  c.model.z_dim = 128
  c.model.w_dim = 128
  c.model.mapping_layers = 2
  c.model.channel_base = 1024     # 32 channels at 32x32, 64 at 16x16, 128 below (G 0.75M).
  c.model.channel_max = 128
  c.model.mbstd_group_size = 32   # The whole batch (the reference's cifar setting).
  c.loss.r1_gamma = 0.01
  c.loss.pl_weight = 0.0
  c.loss.style_mixing_prob = 0.0
  c.train.batch_size = 32
  c.train.num_steps = 40_000      # An upper bound: stop it earlier (SIGTERM saves) as time allows.
  c.train.ema_kimg = 10.0
  c.train.log_every = 100
  c.train.sample_every = 1000
  c.train.checkpoint_every = 1000
  c.augment.policy = 'color,translation,cutout'
  c.augment.ada_target = 0.6
  c.augment.ada_kimg = 100
  c.sample.batch_size = 64
  return c
