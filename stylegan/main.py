"""StyleGAN2 entry point.

  python -m stylegan.main --config=stylegan/configs/NAME.py --workdir=DIR [--mode=sample]

--mode=train (default) trains, resuming from DIR's last checkpoint if any, and
stops cleanly (checkpoint first) on SIGTERM; --mode=sample writes
config.sample.num_images images (1.jpg ... N.jpg) and a grid from G_ema.
Any config value can be overridden, e.g. --config.sample.psi=0.7,
--config.sample.num_images=1000 or --config.data.path=/data/faces.
"""

from common import launch
from stylegan.configs import base as config_lib


def _train(config, workdir):
  from stylegan import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(config, workdir)


def _sample(config, workdir):
  from stylegan import sample  # pylint: disable=g-import-not-at-top
  sample.generate(config, workdir)


if __name__ == '__main__':
  launch.run(config_lib.validate, {'train': _train, 'sample': _sample})
