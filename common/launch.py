"""The command line every model shares: --config, --workdir, --mode.

  python -m PACKAGE.main --config=PACKAGE/configs/NAME.py --workdir=DIR [--mode=sample]
      [--config.KEY=VALUE ...] [--debug]

The config is validated before anything touches devices, data or the compiler;
then (on a cluster) jax.distributed is started and the mode's function runs.
A mistake of the user's (an unknown key, a bad value, a missing folder or
checkpoint: a `common.errors.UserError`) is printed as one line,
`error: ...`, with exit status 2; --debug shows the traceback as well. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import re
import runpy
import sys
from typing import Callable, Sequence

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from common import config as config_lib
from common import errors, logs, mesh

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (get_config()).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
flags.DEFINE_bool('debug', False, 'Print Python tracebacks for user errors too.')


def _fail(message: str, exit_code: int = 2) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(exit_code)


def unknown_override(config, overrides: Sequence[str]) -> str | None:
  """A one-line message for the first override path not in `config`, else None."""
  leaves = list(config_lib.flatten(config))
  keys = leaves + [k.rsplit('.', i)[0] for k in leaves for i in range(1, k.count('.') + 1)]
  for path in overrides:
    if path not in keys:
      close = difflib.get_close_matches(path, keys, n=1, cutoff=0.6)
      hint = f' (did you mean {close[0]}?)' if close else ''
      return f'unknown config key {path}{hint}'
  return None


def _explain_flag_error(argv: Sequence[str], exc: Exception) -> str:
  """Turns a flag-parsing failure into one line, naming the config key where it is one."""
  overrides = [m.group(1) for a in argv
               if (m := re.match(r'^--?config\.([^=]+)(=|$)', a))]
  config_arg = next((a.split('=', 1)[1] for a in argv
                     if re.match(r'^--?config=', a)), None)
  if overrides and config_arg:
    try:  # Load the file as the flag does (get_config, optional ':arg') to name the key.
      path, _, arg = config_arg.partition(':')
      get_config = runpy.run_path(path)['get_config']
      message = unknown_override(get_config(arg) if arg else get_config(), overrides)
      if message:
        return message
    except Exception:  # pylint: disable=broad-except
      pass  # The file itself is the problem: absl's message below says how.
  text = str(exc.args[0]) if exc.args else repr(exc)
  return ' '.join(text.split())


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with one-line errors (exit 2) instead of tracebacks."""
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if '--debug' in argv:
      raise
    _fail(_explain_flag_error(argv, e))
  return []  # Unreachable.


def call(fn: Callable, *args):
  """fn(*args), a UserError printed as one `error:` line (exit status from the error)."""
  try:
    return fn(*args)
  except errors.UserError as e:
    if FLAGS.debug:
      raise
    _fail(str(e), e.exit_code)


def run(validate: Callable, modes: dict[str, Callable],
        default_mode: str = 'train') -> None:
  """absl app: validate(config), then modes[--mode](config, workdir)."""
  flags.DEFINE_enum('mode', default_mode, list(modes),
                    'What to do with the workdir: ' + ', '.join(modes) + '.')
  flags.mark_flags_as_required(['config', 'workdir'])

  def main(argv):
    if len(argv) > 1:
      _fail(f'unexpected arguments: {" ".join(argv[1:])}')
    logs.quiet_library_logs()

    def checked_validate(config):
      try:
        validate(config)
      except (KeyError, ValueError, TypeError) as e:  # Every validation failure is the user's.
        raise errors.ConfigError(str(e.args[0]) if e.args else repr(e)) from e

    call(checked_validate, FLAGS.config)  # Before any device, data or compilation.
    cpu_devices = FLAGS.config.get('cpu_devices', 0)
    if cpu_devices:
      # Must precede the first use of a backend. XLA runs small convolutions on one core;
      # N CPU devices run N data-parallel shards at once. GPUs and TPUs are unaffected.
      jax.config.update('jax_num_cpu_devices', cpu_devices)
    mesh.initialize_distributed()
    logging.info('JAX process %d/%d, devices: %s', jax.process_index(), jax.process_count(),
                 ', '.join(str(d) for d in jax.devices()))
    call(modes[FLAGS.mode], FLAGS.config, FLAGS.workdir)

  app.run(main, flags_parser=parse_flags)
