"""Early config validation: a wrong key or value fails before any compute.

Every package keeps a reference config (its defaults) and a ``validate``
function built from these checks; ``main`` calls it before touching data or
devices, and each message names the offending key.
"""

from __future__ import annotations

import difflib
import pathlib
from typing import Any, Iterable, Mapping

import ml_collections

from common.errors import ConfigError, MissingFileError, UnknownKeyError


def check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
               prefix: str = 'config') -> None:
  """Every key of `config` must exist in `reference` (recursively): catches typos."""
  for key, value in config.items():
    name = f'{prefix}.{key}'
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference.keys()), n=1, cutoff=0.6)
      hint = f' (did you mean {prefix}.{close[0]}?)' if close else ''
      raise UnknownKeyError(f'Unknown config key {name!r}{hint}; valid keys here: '
                            f'{", ".join(sorted(reference.keys()))}.')
    ref = reference[key]
    if isinstance(value, ml_collections.ConfigDict) and isinstance(ref, ml_collections.ConfigDict):
      check_keys(value, ref, name)


def check_choice(value: Any, choices: Iterable[Any], name: str) -> None:
  choices = tuple(choices)
  if value not in choices:
    raise ConfigError(f'{name}={value!r} is not one of {", ".join(map(repr, choices))}.')


def check_positive(value: Any, name: str, allow_zero: bool = False) -> None:
  ok = value >= 0 if allow_zero else value > 0
  if not ok:
    raise ConfigError(f'{name} must be {">= 0" if allow_zero else "> 0"}, got {value!r}.')


def check_range(value: float, lo: float, hi: float, name: str) -> None:
  if not lo <= value <= hi:
    raise ConfigError(f'{name} must be in [{lo}, {hi}], got {value!r}.')


def check_power_of_two(value: int, name: str) -> None:
  if value < 1 or value & (value - 1):
    raise ConfigError(f'{name} must be a power of two, got {value!r}.')


def flatten(config: Mapping, prefix: str = '') -> dict[str, Any]:
  """{'train.num_steps': 5, ...}: the leaves of a (nested) config or dict by dotted path."""
  out = {}
  for k, v in config.items():
    if hasattr(v, 'items'):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def check_exists(path: str, name: str, folder_ok: bool = False) -> None:
  """A named input file (or, with folder_ok, folder) exists: checked before any compute."""
  p = pathlib.Path(path)
  if not (p.is_file() or (folder_ok and p.is_dir())):
    raise MissingFileError(f'{name}={path!r} does not exist.')


def parse_weighted_path(spec: str, name: str) -> tuple[str, float]:
  """'runs/ft/lora.safetensors:0.8' -> (path, 0.8); without ':STRENGTH' the strength is 1."""
  if not isinstance(spec, str) or not spec:
    raise ConfigError(f'{name}={spec!r} must be a file path, optionally with ":STRENGTH".')
  path, sep, strength = spec.rpartition(':')
  if not sep:
    return spec, 1.0
  try:
    return path, float(strength)
  except ValueError:
    raise ConfigError(f'{name}={spec!r}: {strength!r} after the last ":" is not a number '
                      '(write PATH:STRENGTH, e.g. lora.safetensors:0.8).') from None


def override(config, items) -> None:
  """Sets 'KEY=VALUE' items ('--config.' prefix optional) in place: VALUE a Python literal
  (numbers, booleans, tuples), else a string. For scripts without absl's config flags."""
  import ast  # pylint: disable=g-import-not-at-top
  for item in items:
    key, value = item.removeprefix('--config.').split('=', 1)
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value


def from_file(path: str | pathlib.Path, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """A config file's get_config() with 'KEY=VALUE' overrides (`override`), for scripts."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('config_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  override(config, overrides)
  return config
