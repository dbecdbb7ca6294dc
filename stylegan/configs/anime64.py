"""StyleGAN2 on 64x64 anime faces from an image folder (HW6's ~70k faces).

python -m stylegan.main --config=stylegan/configs/anime64.py --workdir=runs/sg_anime64 \
    --config.data.path=/path/to/faces
Defaults to the 15.8k getchu faces in ../shared for a quick real-data run.
"""

from stylegan.configs import base


def get_config():
  c = base.get_config()
  c.data.source = 'folder'
  c.data.path = '../shared/data/anime_faces_getchu64/images'
  c.data.image_size = 64
  c.model.resolution = 64
  # 70k images is FFHQ-sized: the paper's 8-layer mapping (2 suits small sets).
  c.model.mapping_layers = 8
  c.model.channel_base = 16384    # 256 channels at 64x64, 512 at 32x32 and below.
  c.train.batch_size = 32
  # ADA's heuristics: gamma = 0.0002 * 64**2 / 32; EMA half-life batch * 10/32 kimg.
  c.loss.r1_gamma = 0.0256
  c.train.ema_kimg = 10.0
  c.train.num_steps = 150_000  # 4.8M images.
  # ADA on top of DiffAugment's ops: p only rises if D starts to overfit.
  c.augment.policy = 'color,translation,cutout'
  c.augment.ada_target = 0.6
  return c
