"""Super-resolution of 64x64 anime faces from 16x16 (x4) and 32x32 (x2): one SR3 model.

Holds the CPU-scale recipe measured in benchmarks/RESULTS.md ("Super-resolution"): a
2.5M-parameter convolutional U-Net (32, 64, 128 channels, one resnet per level, no attention),
trained on random 32x32 crops (sr.crop_size; 4x the steps per CPU hour, the model runs on the
whole 64x64 image), batch 16, 3,500 steps (32 minutes on 2 busy CPU cores), on the getchu faces
but the last 500 (sr.holdout). On an accelerator, scale it up, e.g.
  --config.model.block_out_channels='(64,128,256,256)' --config.model.layers_per_block=2
  --config.sr.crop_size=0 --config.model.attention_resolutions='(16,)' \
  --config.model.mid_attention=True --config.train.batch_size=64 \
  --config.train.num_steps=100000 --config.train.ema_decay=0.9999

  python -m ddpm.main --config=ddpm/configs/sr_anime.py --workdir=runs/sr_anime
  python -m ddpm.main --config=ddpm/configs/sr_anime.py --workdir=runs/sr_anime --mode=upscale \
      --config.sample.input=LOW_RES_FOLDER   # 16x16 and/or 32x32 images -> runs/sr_anime/upscaled
"""

from ddpm.configs import sr_base


def get_config():
  config = sr_base.get_config()
  config.data.source = 'folder'
  config.data.path = '../shared/data/anime_faces_getchu64/images'
  config.data.image_size = 64

  config.augment.enabled = True
  config.augment.rotation_degrees = 0.0  # Flips only: a rotation's resampling blurs the target.
  config.augment.brightness = 0.0
  config.augment.contrast = 0.0

  config.sr.factors = (2, 4)
  config.sr.downsample = 'box'
  config.sr.noise_schedule = 'linear'
  config.sr.max_noise_level = 150
  config.sr.crop_size = 32                # Trains on 32x32 crops: 4x the steps per CPU hour.
  config.sr.holdout = 500

  m = config.model
  m.block_out_channels = (32, 64, 128)
  m.layers_per_block = 1
  m.attention_resolutions = ()           # Convolutional only, so crops carry over to whole images.
  m.mid_attention = False
  m.norm_groups = 8

  config.diffusion.schedule = 'cosine'
  config.diffusion.num_timesteps = 1000
  config.diffusion.prediction = 'v'

  config.optim.learning_rate = 5e-4
  config.optim.warmup_steps = 200
  config.optim.lr_schedule = 'cosine'

  t = config.train
  t.batch_size = 16
  t.num_steps = 3500
  t.log_every = 100
  t.checkpoint_every = 500
  t.sample_every = 1000
  t.num_grid_samples = 8
  t.ema_decay = 0.999

  s = config.sample
  s.sampler = 'dpm_solver'
  s.num_steps = 25
  s.noise_level = 20
  s.batch_size = 100
  return config
