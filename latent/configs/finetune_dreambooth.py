"""DreamBooth (Ruiz et al. 2023): the whole U-Net on "sks <class>", with prior preservation.

  python -m latent.main --config=latent/configs/finetune_dreambooth.py --workdir=runs/ft_db \
      --config.base_workdir=runs/ldm_text --config.data.path=CONCEPT_FOLDER \
      --config.concept.token=sks --config.concept.class_prompt=hair

The base first draws finetune.num_class_images images of the class prompt
(WORKDIR/class_images); each step fits the concept images and those, so the class
keeps its look. --config.finetune.prior_preservation=False drops them;
--config.finetune.train_text_encoder=True trains the text encoder too. The artefact is
the run itself: sample it with --mode=sample and the same --workdir.
"""

from latent.configs import finetune_base


def get_config():
  config = finetune_base.get_config()
  config.method = 'dreambooth'
  config.finetune.prior_preservation = True
  config.optim.learning_rate = 1e-4  # For a Stable-Diffusion-sized U-Net, 5e-6 (the paper).
  return config
