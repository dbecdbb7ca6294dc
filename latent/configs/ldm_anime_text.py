"""Text-to-image on the captioned anime faces: "blonde long hair and blue eyes" -> a face.

64x64 faces through vae_anime's factor-4 autoencoder: 16x16x4 latents. A
GPU run (expected: about 6 steps/s at batch 64 on one H100-class GPU, so
100k steps take ~5 h; not measured here, where no GPU was lent).

  python -m latent.main --config=latent/configs/vae_anime.py --workdir=runs/vae_anime
  python -m latent.main --config=latent/configs/ldm_anime_text.py --workdir=runs/ldm_text
"""

from latent.configs import ldm_base


def get_config():
  config = ldm_base.get_config()
  config.vae_workdir = 'runs/vae_anime'
  config.data.path = '../shared/data/anime_faces_mlds96_tagged/images'
  config.data.image_size = 64
  config.conditioning.kind = 'text'
  config.conditioning.max_length = 16
  config.train.batch_size = 64
  config.train.num_steps = 100_000
  config.train.sample_every = 5_000
  config.train.ema_decay = 0.9999
  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 1_000
  return config
