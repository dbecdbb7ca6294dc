"""The package's own import graph: every module imports in a fresh interpreter, no two files
import each other (directly or round a loop, function-level imports included), and no file
imports another package's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ('common', 'ddpm', 'latent', 'metrics', 'stylegan')


def modules() -> dict[str, Path]:
  """{dotted name: file} of every module of the project's packages."""
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob('*.py')):
      parts = path.relative_to(ROOT).with_suffix('').parts
      name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
      out[name] = path
  return out


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
  """(module imported, names taken from it) of every import statement in `path`, at any depth,
  limited to the project's modules."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found += [(a.name, []) for a in node.names if a.name in known]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        sub = f'{node.module}.{alias.name}'
        if sub in known:  # `from latent.ldm import train`: the module latent.ldm.train.
          found.append((sub, []))
        elif node.module in known:
          found.append((node.module, [alias.name]))
  return found


def graph() -> dict[str, set[str]]:
  known = modules()
  return {name: {m for m, _ in imports(path, known) if m != name}
          for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One import loop [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        loop = visit(nxt)
        if loop:
          return loop
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(edges):
    if node not in state:
      loop = visit(node)
      if loop:
        return loop
  return None


def test_cycle_finder_sees_a_loop():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_no_import_cycle_between_files():
  edges = graph()
  assert 'latent.sd.pipeline' in edges and 'latent.ldm.sampler' in edges['latent.sd.pipeline']
  assert find_cycle(edges) is None, ' -> '.join(find_cycle(edges))


def test_no_private_name_imported_across_packages():
  known = modules()
  offenders = []
  for name, path in known.items():
    for module, names in imports(path, known):
      if module.split('.')[0] != name.split('.')[0]:
        offenders += [f'{name} imports {module}.{n}' for n in names if n.startswith('_')]
  assert not offenders, offenders


def test_every_module_imports_in_a_fresh_interpreter():
  names = [n for n in modules() if not n.endswith('__main__')]
  code = 'import importlib, sys\nfor n in sys.argv[1:]:\n  importlib.import_module(n)\n'
  result = subprocess.run([sys.executable, '-c', code, *names], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
