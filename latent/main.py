"""Entry point for both stages: python -m latent.main --config=latent/configs/NAME.py --workdir=DIR

A config's `stage` picks what runs:
  stage 'vae' (latent/configs/vae_*.py): trains the autoencoder (stage 1);
  stage 'pipeline' (latent/configs/sd_pipeline.py): --mode=sample runs a Stable Diffusion
    pipeline folder (diffusers' layout) on config.sample.prompts;
  stage 'ldm' (latent/configs/ldm_*.py): trains the conditional denoiser on the
    latents of config.vae_workdir (stage 2), or with --mode=sample writes
    images for config.sample.prompts (image-to-image / inpainting with
    config.sample.init_image / config.sample.mask);
  stage 'finetune' (latent/configs/finetune_*.py): teaches the text LDM of
    config.base_workdir a concept (LoRA, DreamBooth, textual inversion, hypernetwork),
    or with --mode=sample samples the fine-tuned model.
Both resume from DIR's last checkpoint; any value can be overridden with --config.KEY=VALUE.
"""

from common import errors, launch
from latent.configs import finetune_base, ldm_base, sd_pipeline, vae_base
from latent.finetune import experiment as finetune
from latent.ldm import sample, train
from latent.sd import sample as sd_sample
from latent.vae import train as vae_train


def validate(config):
  stage = config.get('stage')
  if stage == 'vae':
    vae_base.validate(config)
  elif stage == 'ldm':
    ldm_base.validate(config)
  elif stage == 'pipeline':
    sd_pipeline.validate(config)
  elif stage == 'finetune':
    finetune_base.validate(config)
  else:
    raise errors.ConfigError(f"config.stage={stage!r} is not one of 'vae', 'ldm', 'finetune', "
                             "'pipeline'.")


def train_either(config, workdir):
  if config.stage == 'pipeline':
    raise errors.ConfigError('A Stable Diffusion pipeline config samples (--mode=sample); to '
                             'fine-tune one, use latent/configs/finetune_*.py with '
                             '--config.pipeline=DIR.')
  if config.stage == 'vae':
    return vae_train.train_and_evaluate(config, workdir)
  if config.stage == 'finetune':
    return finetune.train_and_evaluate(config, workdir)
  return train.train_and_evaluate(config, workdir)


def sample_ldm(config, workdir):
  if config.stage == 'pipeline':
    return sd_sample.generate(config, workdir)
  if config.stage not in ('ldm', 'finetune'):
    raise errors.ConfigError('--mode=sample needs a stage-2 (ldm) config; a stage-1 run writes its '
                     'reconstructions to WORKDIR/reconstructions while it trains.')
  return sample.generate(config, workdir)


if __name__ == '__main__':
  launch.run(validate, {'train': train_either, 'sample': sample_ldm})
