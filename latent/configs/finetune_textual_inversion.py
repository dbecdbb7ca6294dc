"""Textual inversion (Gal et al. 2022): one new embedding row for the concept's token.

  python -m latent.main --config=latent/configs/finetune_textual_inversion.py \
      --workdir=runs/ft_ti --config.base_workdir=runs/ldm_text \
      --config.data.path=CONCEPT_FOLDER --config.concept.token=sks \
      --config.concept.init_word=hair --config.concept.class_prompt=hair

Only `encoder/added_token_embedding` trains; WORKDIR/learned_embeds.safetensors holds it
({token: [1, width]}, diffusers' layout). Sample the base with it:
  --config.sample.embeddings="('runs/ft_ti/learned_embeds.safetensors',)"
"""

from latent.configs import finetune_base


def get_config():
  config = finetune_base.get_config()
  config.method = 'textual_inversion'
  config.concept.init_word = 'hair'
  config.optim.learning_rate = 5e-3
  return config
