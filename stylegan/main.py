"""StyleGAN2 entry point.

  python -m stylegan.main --config=stylegan/configs/NAME.py --workdir=DIR [--mode=sample]

--mode=train (default) trains, resuming from DIR's last checkpoint if any, and
stops cleanly (checkpoint first) on SIGTERM; --mode=sample writes
config.sample.num_images images (1.jpg ... N.jpg) and a grid from G_ema.
Any config value can be overridden, e.g. --config.sample.psi=0.7,
--config.sample.num_images=1000 or --config.data.path=/data/faces.
"""

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from common import logs, mesh
from stylegan import config as config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (get_config()).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample'], 'What to do.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config_lib.validate(FLAGS.config)  # Before any device, data or compilation.
  logs.quiet_library_logs()
  mesh.initialize_distributed()
  logging.info('JAX process %d/%d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  from stylegan import sample, training_loop  # pylint: disable=g-import-not-at-top
  if FLAGS.mode == 'train':
    training_loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    sample.generate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
