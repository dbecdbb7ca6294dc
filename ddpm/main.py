"""Entry point: python -m ddpm.main --config=ddpm/configs/NAME.py --workdir=DIR [--mode=sample].

--mode=train (default) trains, resuming from DIR's last checkpoint if any;
--mode=sample writes config.sample.num_images images (1.jpg ... N.jpg), a grid
and the progressive figure from DIR's last checkpoint. Any config value can be
overridden, e.g. --config.sample.sampler=ddpm or --config.train.num_steps=500.

A super-resolution config (ddpm/configs/sr_*.py, base sr_base.py) trains the SR U-Net of
ddpm/sr.py; --mode=upscale --config.sample.input=FOLDER then writes every image of FOLDER
upscaled, under the same file names, to DIR/upscaled (or sample.output_dir).
"""

from common import errors, launch
from ddpm import sample, sr, train
from ddpm.configs import default, sr_base


def validate(config):
  (sr_base.validate if sr_base.is_sr(config) else default.validate)(config)


def train_either(config, workdir):
  if sr_base.is_sr(config):
    return sr.train_and_evaluate(config, workdir)
  return train.train_and_evaluate(config, workdir)


def generate(config, workdir):
  if sr_base.is_sr(config):
    raise errors.ConfigError('A super-resolution config upscales a folder of images: use '
                             '--mode=upscale --config.sample.input=FOLDER.')
  return sample.generate(config, workdir)


def upscale(config, workdir):
  if not sr_base.is_sr(config):
    raise errors.ConfigError('--mode=upscale needs a super-resolution config '
                             '(e.g. ddpm/configs/sr_anime.py).')
  return sr.upscale(config, workdir)


if __name__ == '__main__':
  launch.run(validate, {'train': train_either, 'sample': generate, 'upscale': upscale})
