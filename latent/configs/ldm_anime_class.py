"""Class-conditional anime faces: the class is the caption's hair colour (13 colours).

Same data, autoencoder and denoiser as ldm_anime_text; the context is one
learned embedding per hair colour. Captions naming no single hair colour are
left out of training (logged). Prompts are colour names ("red") or captions.
"""

from latent.configs import ldm_anime_text


def get_config():
  config = ldm_anime_text.get_config()
  config.conditioning.kind = 'class'
  config.train.grid_prompts = ('blonde', 'black', 'red', 'blue', 'pink', 'white')
  config.sample.prompts = ('blonde', 'red', 'blue')
  return config
