"""LoRA fine-tuning of a text LDM (Hu et al. 2021): rank-4 adapters on the U-Net's attention.

  python -m latent.main --config=latent/configs/finetune_lora.py --workdir=runs/ft_lora \
      --config.base_workdir=runs/ldm_text --config.data.path=CONCEPT_FOLDER \
      --config.concept.token=sks --config.concept.class_prompt=hair

Writes WORKDIR/lora.safetensors (PEFT/diffusers keys); sample the base with it:
  python -m latent.main --config=latent/configs/ldm_anime_text.py --workdir=runs/ldm_text \
      --mode=sample --config.sample.adapters="('runs/ft_lora/lora.safetensors:0.8',)" ...
(its token, if new, comes with the fine-tuning run: sample that run's workdir instead).
"""

from latent.configs import finetune_base


def get_config():
  config = finetune_base.get_config()
  config.method = 'lora'
  config.lora.rank = 4
  config.optim.learning_rate = 3e-4
  return config
