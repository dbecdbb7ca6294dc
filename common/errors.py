"""Errors that are the user's to fix: the commands print them as one line and exit 2.

A `UserError` says what is wrong with the user's input (a config value, a
folder, a missing file or checkpoint) and how to fix it; `common.launch` and
`python -m metrics` print it as `error: <message>` with exit status 2 (no
traceback unless --debug). Anything else is a bug and keeps its traceback.

Each subclass also derives from the built-in exception a caller would expect
(ValueError, KeyError, FileNotFoundError, ...), so library users can catch
either.
"""

from __future__ import annotations


class UserError(Exception):
  """Bad input from the user; `exit_code` is the command's exit status."""
  exit_code = 2

  def __str__(self) -> str:
    # KeyError's str() quotes its message; every user error prints its text as given.
    return str(self.args[0]) if self.args else ''


class ConfigError(UserError, ValueError):
  """A config value (or combination of values) that cannot work; names the key."""


class UnknownKeyError(UserError, KeyError):
  """A config key that does not exist (a typo)."""


class DataError(UserError, ValueError):
  """An image folder, caption table or data set that cannot be used as it is."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the run needs is not there; the message says how to get it."""


class WorkdirError(UserError, ValueError):
  """A workdir that holds a different run (resuming it would make its checkpoints meaningless)."""


class TrainingDiverged(UserError, FloatingPointError):
  """The loss went NaN/inf: the run stopped before saving the bad state (exit status 1)."""
  exit_code = 1
