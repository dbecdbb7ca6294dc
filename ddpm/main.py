"""Entry point: python -m ddpm.main --config=ddpm/configs/NAME.py --workdir=DIR [--mode=sample].

--mode=train (default) trains, resuming from DIR's last checkpoint if any;
--mode=sample writes config.sample.num_images images (1.jpg ... N.jpg), a grid
and the progressive figure from DIR's last checkpoint. Any config value can be
overridden, e.g. --config.sample.sampler=ddpm or --config.train.num_steps=500.
"""

from common import launch
from ddpm import sample, train
from ddpm.configs import default

if __name__ == '__main__':
  launch.run(default.validate, {'train': train.train_and_evaluate, 'sample': sample.generate})
