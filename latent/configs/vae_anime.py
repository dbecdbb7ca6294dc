"""Stage 1 on the captioned anime faces at 64x64: factor 4 (16x16x4 latents), a GPU run.

The 6,000 faces of ../shared/data/anime_faces_mlds96_tagged (96x96, resized to
64x64), 64 of them held out for the reconstruction PSNR. LDM's kl-f4 recipe
scaled to the data: L1 reconstruction, KL weight 1e-6, the patch GAN with the
adaptive weight from step 20k, Adam(0.5, 0.9).

Expected time (not measured here: this build was written on a CPU-only
machine): the autoencoder has 55M parameters (LDM kl-f4); at batch 32 on one
H100/H200 in float32 it should run on the order of 10 steps/s, so the
40k steps take about 1 to 1.5 hours, and with bfloat16 (vae.dtype) less.
"""

from latent.configs import vae_base


def get_config():
  config = vae_base.get_config()
  config.data.source = 'folder'
  config.data.path = '../shared/data/anime_faces_mlds96_tagged/images'
  config.data.image_size = 64

  config.vae.block_out_channels = (128, 256, 512)
  config.vae.layers_per_block = 2
  config.vae.latent_channels = 4
  config.vae.norm_groups = 32

  config.loss.rec_loss = 'l1'
  config.loss.kl_weight = 1e-6
  config.loss.disc_start = 20_000
  config.loss.disc_weight = 0.5

  config.optim.learning_rate = 1e-4
  config.disc_optim.learning_rate = 1e-4

  config.train.batch_size = 32
  config.train.num_steps = 40_000
  config.train.log_every = 100
  config.train.checkpoint_every = 2_000
  config.train.eval_every = 2_000
  config.train.num_eval_images = 64
  config.train.scale_factor_images = 2_000
  return config
