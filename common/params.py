"""Parameter rules: which weights train, at what learning rate, with what decay, and how sharded.

Every trainer reads one config section, `config.params`, of ordered
`(regex, value)` rules over parameter paths such as
`down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_k/kernel` (the module
names of the parameter table, `parameters_<net>.txt`, with '.' written as '/').
For each parameter the first rule whose regex matches the whole path decides;
a parameter no rule matches gets the default. A rule that is malformed or
matches no parameter is a config error naming it, raised before any compute
(`Rules.check`), as big_vision's `schedule`/`lr_mults` rules and
MaxDiffusion's logical axis rules are; so is an alternative of a rule's alternation
that matches nothing (the `conv_zz` of `(conv_in|conv_zz)/.*`: a typo there would
otherwise pass silently). The shipped default `weight_decay` rule is exempt from that:
it is written for every model, with or without norm scales.

    trainable       (regex, bool): False freezes (no gradient, no optimiser state, no EMA).
    lr_multipliers  (regex, float): the learning rate times this (optax.multi_transform).
    weight_decay    (regex, bool): False exempts from AdamW's decay (its mask).
    sharding        (regex, 'fsdp' | 'replicated'): how the array and its optimiser state
                    lie over the mesh's fsdp axis (common.mesh). Default 'fsdp': the
                    largest dimension divisible by the axis size is split, arrays smaller
                    than params.min_shard_size are replicated.

Frozen weights stay in the train state (checkpointed, sharded like the rest) but are
split off before differentiation (`split`/`merge`), so the step differentiates and
updates the trainable subtree only.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import flax.traverse_util
import jax
import ml_collections
import numpy as np

from common import config as config_lib
from common.errors import ConfigError

SHARDINGS = ('fsdp', 'replicated')


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainable = ()       # E.g. (('.*lora_.*', True), ('.*', False)) trains the adapters only.
  c.lr_multipliers = ()  # E.g. (('text_encoder/.*', 0.1),).
  c.weight_decay = (('.*(bias|scale)', False),)  # AdamW: no decay on biases and norm scales.
  c.sharding = ()        # E.g. (('.*embedding', 'replicated'),); unmatched: 'fsdp'.
  c.min_shard_size = 2**14  # Under mesh.fsdp > 1, arrays with fewer elements stay whole.
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Malformed rules fail here; rules that match nothing fail once the model's shapes are
  known (`Rules.check`, still before any compute)."""
  Rules(c)


def path_str(path: Iterable[Any]) -> str:
  """A key path (tree_util's or flatten_dict's tuple) as 'a/b/c', module '.' as '/'."""
  parts = []
  for k in path:
    k = getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))
    parts.append(str(k).replace('.', '/'))
  return '/'.join(parts)


def _alternations(pattern: str) -> list[tuple[int, int, list[int]]]:
  """(body start, body end, positions of its top-level '|') of each alternation in
  `pattern`: the pattern itself and every group's body. Escapes, character classes and
  comments are skipped; negative lookarounds and conditionals are not listed (narrowing
  them widens the match)."""
  out, n = [], len(pattern)
  stack = [(0, [], True)]  # (body start, bars, listed)
  i = 0
  while i < n:
    ch = pattern[i]
    if ch == '\\':
      i += 2
      continue
    if ch == '[':  # A class: '|' and parentheses in it are literal.
      j = i + 1
      j += pattern.startswith('^', j)
      j += pattern.startswith(']', j)
      while j < n and pattern[j] != ']':
        j += 2 if pattern[j] == '\\' else 1
      i = j + 1
      continue
    if ch == '(':
      body, listed = i + 1, True
      if pattern.startswith('?', body):
        if pattern.startswith('?#', body):  # A comment.
          j = pattern.find(')', body)
          i = n if j < 0 else j + 1
          continue
        if pattern.startswith('?P<', body):
          body = pattern.find('>', body) + 1
        elif pattern.startswith(('?:', '?=', '?>'), body):
          body += 2
        elif pattern.startswith('?<=', body):
          body += 3
        elif pattern.startswith(('?!', '?<!', '?(', '?P='), body):
          listed = False
        else:  # Flags: (?i) alone, or (?i:...) scoping a body.
          j = body
          while j < n and pattern[j] not in ':)':
            j += 1
          if j >= n or pattern[j] == ')':
            i = j + 1
            continue
          body = j + 1
      stack.append((body, [], listed))
      i = body
      continue
    if ch == ')' and len(stack) > 1:
      start, bars, listed = stack.pop()
      if bars and listed:
        out.append((start, i, bars))
    elif ch == '|':
      stack[-1][1].append(i)
    i += 1
  if stack[0][1]:
    out.append((0, n, stack[0][1]))
  return out


def unmatched_alternatives(pattern: str, names: Iterable[str]) -> list[str]:
  """The alternatives of `pattern`'s alternations (see `_alternations`) that fullmatch none
  of `names` once the pattern is narrowed to them (their alternation, and every alternation
  around it, keeping only the branch that holds them): '.*/(to_q|to_zz)' over paths without
  a 'to_zz' gives ['to_zz'], '.*/(to_(q|zz)|conv1)' gives ['zz'] too."""
  names = list(names)
  alternations = _alternations(pattern)
  branches = lambda start, end, bars: list(zip([start, *(b + 1 for b in bars)], [*bars, end]))
  out = []
  for start, end, bars in alternations:
    for a, b in branches(start, end, bars):
      keep = []  # The (start, end) kept of this alternation and of each one around it.
      for s, e, bs in alternations:
        if s <= start and end <= e:
          keep.append(next((x, y) for x, y in branches(s, e, bs) if x <= a and b <= y)
                      + (s, e))
      alternative = pattern[a:b]
      try:
        regex = re.compile(_narrow(pattern, keep))
      except re.error:
        continue
      if alternative not in out and not any(regex.fullmatch(n) for n in names):
        out.append(alternative)
  return out


def _narrow(pattern: str, keep: list[tuple[int, int, int, int]]) -> str:
  """`pattern` with each (kept start, kept end, body start, body end) body cut to its kept
  span; the bodies are nested, so the cuts are disjoint."""
  cuts = sorted([(s, x) for x, y, s, e in keep] + [(y, e) for x, y, s, e in keep])
  text, i = [], 0
  for s, e in cuts:
    text.append(pattern[i:s])
    i = e
  return ''.join(text) + pattern[i:]


# Flax module names are diffusers' with each '.N' written '_N' (ddpm.convert); LoRA files and
# weight export go back to the torch names. These torch names have a '_N' of their own.
_TORCH_UNDERSCORE_NAMES = ('linear_1', 'linear_2')


def torch_module_name(path: tuple[str, ...]) -> str:
  """('down_blocks_1.attentions_0', 'to_out_0') -> 'down_blocks.1.attentions.0.to_out.0'."""
  name = '.'.join(path)
  protected = {n: n.replace('_', '\0') for n in _TORCH_UNDERSCORE_NAMES}
  for n, p in protected.items():
    name = re.sub(rf'(^|\.){n}(?=\.|$)', lambda m, p=p: m.group(1) + p, name)
  name = re.sub(r'_(\d+)(?=\.|$)', r'.\1', name)
  return name.replace('\0', '_')


class Rules:
  """The compiled `config.params` rules (see the module docstring)."""

  def __init__(self, c: ml_collections.ConfigDict | None = None):
    c = c if c is not None else get_config()
    defaults = get_config()
    config_lib.check_keys(c, defaults, 'params')
    self.config = c
    # The shipped defaults' rules, exempt from the alternatives check (see the docstring).
    self._defaults = {(key, tuple(rule)) for key in ('trainable', 'lr_multipliers',
                                                     'weight_decay', 'sharding')
                      for rule in defaults[key]}
    self.trainable = self._compile(c.trainable, 'params.trainable', bool)
    self.lr_multipliers = self._compile(c.lr_multipliers, 'params.lr_multipliers', float)
    self.weight_decay = self._compile(c.weight_decay, 'params.weight_decay', bool)
    self.sharding = self._compile(c.sharding, 'params.sharding', str)
    for _, _, value, name in self.sharding:
      config_lib.check_choice(value, SHARDINGS, name)
    for _, _, value, name in self.lr_multipliers:
      config_lib.check_positive(value, name, allow_zero=True)
    config_lib.check_positive(c.min_shard_size, 'params.min_shard_size', allow_zero=True)

  @staticmethod
  def _compile(rules, key: str, kind: type):
    out = []
    for i, rule in enumerate(rules):
      name = f'{key}[{i}]'
      if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
        raise ConfigError(f'{name}={rule!r} is not a (regex, value) pair.')
      pattern, value = rule
      if kind is bool and not isinstance(value, bool):
        raise ConfigError(f'{name}={rule!r}: the value must be True or False.')
      if kind is float and not isinstance(value, (int, float)):
        raise ConfigError(f'{name}={rule!r}: the value must be a number.')
      try:
        regex = re.compile(pattern)
      except re.error as e:
        raise ConfigError(f'{name}: {pattern!r} is not a regular expression ({e}).') from None
      out.append((pattern, regex, kind(value), name))
    return out

  # -- per parameter ---------------------------------------------------------------------

  @staticmethod
  def _first(rules, path: str, default):
    for _, regex, value, _ in rules:
      if regex.fullmatch(path):
        return value
    return default

  def is_trainable(self, path: str) -> bool:
    return self._first(self.trainable, path, True)

  def lr_multiplier(self, path: str) -> float:
    return self._first(self.lr_multipliers, path, 1.0)

  def decays(self, path: str) -> bool:
    return self._first(self.weight_decay, path, True)

  def sharding_of(self, path: str) -> str:
    return self._first(self.sharding, path, 'fsdp')

  @property
  def everything_trainable(self) -> bool:
    return not self.trainable

  def check(self, trees: Mapping[str, Any]) -> None:
    """Raises a ConfigError naming every rule that matches no parameter of `trees`
    ({net name: params or their eval_shape}), and every alternative of a rule's alternation
    that matches none (`unmatched_alternatives`), and when nothing is left to train."""
    paths = [path_str(p) for tree in trees.values()
             for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    unused = []
    for key, rules in (('trainable', self.trainable), ('lr_multipliers', self.lr_multipliers),
                       ('weight_decay', self.weight_decay), ('sharding', self.sharding)):
      for pattern, regex, value, name in rules:
        if not any(regex.fullmatch(p) for p in paths):
          unused.append(f'{name}={pattern!r}')
        elif (key, (pattern, value)) not in self._defaults:
          unused += [f'{name}={pattern!r}: its alternative {alternative!r}'
                     for alternative in unmatched_alternatives(pattern, paths)]
    if unused:
      example = paths[0] if paths else '(none)'
      raise ConfigError(f'{", ".join(unused)} match(es) no parameter (paths look like '
                        f'{example!r}; the full list is in the parameters_*.txt tables).')
    if self.trainable and not any(self.is_trainable(p) for p in paths):
      raise ConfigError('params.trainable freezes every parameter: nothing would train.')

  # -- trees -----------------------------------------------------------------------------

  def mask(self, tree) -> Any:
    """A bool tree like `tree`: True where the parameter trains."""
    return jax.tree_util.tree_map_with_path(lambda p, _: self.is_trainable(path_str(p)), tree)

  def split(self, params) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts holding the parameters the rules assign them.

    With every parameter trainable (the default) `trainable` is `params` itself, so the
    optimiser state and EMA are laid out exactly as without rules.
    """
    if self.everything_trainable:
      return params, {}
    flat = flax.traverse_util.flatten_dict(params)
    keep = {k: self.is_trainable(path_str(k)) for k in flat}
    unflat = lambda want: flax.traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if keep[k] == want})
    return unflat(True), unflat(False)

  @staticmethod
  def merge(trainable, frozen) -> dict:
    """The inverse of `split`."""
    if not frozen:
      return trainable
    flat = flax.traverse_util.flatten_dict(frozen)
    flat.update(flax.traverse_util.flatten_dict(trainable))
    return flax.traverse_util.unflatten_dict(flat)

  def with_ema(self, params, ema_params) -> dict:
    """The full parameters for sampling: the EMA (kept of trainable ones only) over `params`."""
    return self.merge(ema_params, self.split(params)[1])

  def of_state(self, state, use_ema: bool = True) -> dict:
    """A train state's parameters to sample or export: with_ema's, or the raw ones."""
    return self.with_ema(state.params, state.ema_params) if use_ema else state.params

  def optimizer(self, make: Callable[..., Any]):
    """`make(lr_multiplier, decay_mask)` -> an optax transformation, combined over the rules.

    With one multiplier (the default) that is `make(1.0, mask)`; with several, one copy per
    multiplier under `optax.multi_transform`, each seeing only its own parameters (Adam's
    statistics are per parameter, so this equals one optimiser with per-group learning
    rates). `mask` is a callable params -> bool tree (True = decay), as `optax.masked` takes.
    """
    import optax  # pylint: disable=g-import-not-at-top

    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda p, _: self.decays(path_str(p)), params)
    multipliers = sorted({float(v) for _, _, v, _ in self.lr_multipliers} | {1.0})
    if len(multipliers) == 1:
      return make(1.0, decay_mask)
    label = lambda m: f'lr x{m:g}'
    labels = lambda params: jax.tree_util.tree_map_with_path(
        lambda p, _: label(self.lr_multiplier(path_str(p))), params)
    return optax.multi_transform({label(m): make(m, decay_mask) for m in multipliers}, labels)

  def table(self, trees: Mapping[str, Any]) -> str:
    """Trainable / frozen parameter counts per top-level module of each net."""
    rows = [('module', 'trainable', 'frozen')]
    total = np.zeros(2, np.int64)
    for net, tree in trees.items():
      flat = flax.traverse_util.flatten_dict(tree) if isinstance(tree, Mapping) else {}
      counts: dict[str, np.ndarray] = {}
      for k, v in flat.items():
        top = path_str((net, k[0]) if len(trees) > 1 else k[:1])
        c = counts.setdefault(top, np.zeros(2, np.int64))
        c[0 if self.is_trainable(path_str(k)) else 1] += int(np.prod(v.shape))
      for top, c in counts.items():
        rows.append((top, f'{c[0]:,}', f'{c[1]:,}'))
        total += c
    rows.append(('total', f'{total[0]:,}', f'{total[1]:,}'))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return '\n'.join(f'{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}'
                     for r in rows)

  def counts(self, trees: Mapping[str, Any]) -> tuple[int, int]:
    """(trainable, frozen) parameter counts over `trees`."""
    n = [0, 0]
    for tree in trees.values():
      for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
        n[0 if self.is_trainable(path_str(p)) else 1] += int(np.prod(v.shape))
    return n[0], n[1]
