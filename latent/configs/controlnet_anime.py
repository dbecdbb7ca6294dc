"""ControlNet on the anime-face text LDM: faces drawn to follow Canny edges (or scribbles).

The base (ldm_anime_text.py's run) stays frozen; a trainable copy of its U-Net encoder
reads each face's edge map (made once from the images, mirrored with them) and steers
the frozen U-Net through zero-initialised convolutions (latent/controlnet/model.py):

  python -m latent.main --config=latent/configs/controlnet_anime.py --workdir=runs/cn_anime \
      --config.base_workdir=runs/ldm_text
  python -m latent.main --config=latent/configs/controlnet_anime.py --workdir=runs/cn_anime \
      --config.base_workdir=runs/ldm_text --mode=sample \
      --config.sample.control_image=FACE_OR_FOLDER \
      --config.sample.prompts="('red hair and green eyes',)"

Sampling writes the images, and OUT_control_grid.png with each control map beside its
image; --config.controlnet.detector=scribble trains on bold strokes instead, and
--config.sample.control_is_map=True takes hand-made maps (white lines on black) as they are.
The ControlNet is also written as a diffusers ControlNetModel folder, WORKDIR/controlnet.
A GPU run: vae_anime's factor 4 (64x64 faces, 16x16 latents) needs three embedding
widths (two stride-2 stages), not SD's four.
"""

from latent.configs import finetune_base


def get_config():
  config = finetune_base.get_config()
  config.method = 'controlnet'
  config.base_workdir = ''         # --config.base_workdir=runs/ldm_text, or --config.pipeline=DIR.
  config.data.path = '../shared/data/anime_faces_mlds96_tagged/images'  # Its captions.tsv.
  n = config.controlnet
  n.detector = 'canny'
  n.embedding_channels = (16, 32, 96)  # 2 ** 2 = vae_anime's factor 4.
  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 500
  t = config.train
  t.batch_size = 32
  t.num_steps = 20_000
  t.log_every = 100
  t.checkpoint_every = 2_000
  t.sample_every = 1_000
  t.num_grid_samples = 16
  config.sample.batch_size = 64
  config.sample.guidance_scale = 3.0
  config.sample.prompts = ('',)    # The control map alone; captions work as with the base.
  return config
