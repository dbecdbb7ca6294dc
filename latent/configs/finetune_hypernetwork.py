"""A hypernetwork (the SD web UI's kind): residual MLPs on the cross-attention keys/values.

  python -m latent.main --config=latent/configs/finetune_hypernetwork.py \
      --workdir=runs/ft_hn --config.base_workdir=runs/ldm_text \
      --config.data.path=CONCEPT_FOLDER --config.concept.token=sks --config.concept.class_prompt=hair

Writes WORKDIR/hypernetwork.safetensors; sample the base with it at a strength:
  --config.sample.hypernetwork=runs/ft_hn/hypernetwork.safetensors:0.8
"""

from latent.configs import finetune_base


def get_config():
  config = finetune_base.get_config()
  config.method = 'hypernetwork'
  config.optim.learning_rate = 1e-4
  return config
