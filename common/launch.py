"""The command line every model shares: --config, --workdir, --mode=train|sample.

  python -m PACKAGE.main --config=PACKAGE/configs/NAME.py --workdir=DIR [--mode=sample]
      [--config.KEY=VALUE ...]

The config is validated before anything touches devices, data or the compiler;
then (on a cluster) jax.distributed is started and the mode's function runs.
"""

from typing import Callable

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from common import logs, mesh

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (get_config()).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample'],
                  'train: train, resuming from the workdir; sample: write images from the '
                  "workdir's last checkpoint.")
flags.mark_flags_as_required(['config', 'workdir'])


def run(validate: Callable, modes: dict[str, Callable]) -> None:
  """absl app: validate(config), then modes[--mode](config, workdir)."""

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    validate(FLAGS.config)  # Before any device, data or compilation.
    logs.quiet_library_logs()
    cpu_devices = FLAGS.config.get('cpu_devices', 0)
    if cpu_devices:
      # Must precede the first use of a backend. XLA runs small convolutions on one core;
      # N CPU devices run N data-parallel shards at once. GPUs and TPUs are unaffected.
      jax.config.update('jax_num_cpu_devices', cpu_devices)
    mesh.initialize_distributed()
    logging.info('JAX process %d/%d, devices: %s', jax.process_index(), jax.process_count(),
                 jax.devices())
    modes[FLAGS.mode](FLAGS.config, FLAGS.workdir)

  app.run(main)
