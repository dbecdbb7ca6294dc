"""Where a benchmark's compiled step spends its time, op by op (CPU or GPU).

  python benchmarks/profile_step.py latent-train [--batch 16] [--top 30]
  python benchmarks/profile_step.py ddpm-train | ddpm-forward

Runs the step a few times under `jax.profiler`, reads the trace's per-op events and the
compiled HLO, and prints the op time summed by kind (library-call fusions split into
convolutions and matmuls, forward and backward; elementwise fusions; layout copies) and the
`--top` single ops with their shapes and the model path they come from. Op times of ops
that XLA runs side by side add up to more than the wall time. This is how the attention
layout, the Dense contraction and the erfc GELU were found (RESULTS.md, "latent").
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_latent  # pylint: disable=wrong-import-position  (patches torchvision first)
import bench_ddpm  # pylint: disable=wrong-import-position
from ddpm import train as ddpm_train  # pylint: disable=wrong-import-position
from ddpm.configs import cifar10  # pylint: disable=wrong-import-position

# Trace events that are the runtime's bookkeeping, not ops of the program.
_RUNTIME = ('ThunkExecutor', 'SlinkyThreadPool', '$', 'Pjit', 'end:', 'Threadpool', 'Common',
            'Parse', 'Handle', 'shard_args', 'Alloc', 'Wait', 'Device', 'H2D', 'Python')


def ddpm_train_step(batch):
  """bench_ddpm's cifar10 train step on one device."""
  run, _, _, lower, _ = bench_ddpm.train_step_fn(batch, jax.devices()[:1])
  return run, lower


def ddpm_forward(batch):
  """The cifar10 U-Net's forward pass alone."""
  config = cifar10.get_config()
  model = ddpm_train.build_model(config)
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, 32, 32, 3))
  t = jnp.arange(batch) * (1000 // batch)
  params = model.init(jax.random.PRNGKey(0), x[:1], t[:1])['params']
  fwd = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t))
  return lambda: fwd(params, x, t).block_until_ready(), lambda: fwd.lower(params, x, t)


def latent_train_step(batch):
  """bench_latent's ldm_anime_text train step."""
  run, _, _, _, lower, _ = bench_latent.ours_train_fn(batch)
  return run, lower


TARGETS = {'ddpm-train': ddpm_train_step, 'ddpm-forward': ddpm_forward,
           'latent-train': latent_train_step}


def op_table(trace_dir: str, hlo: str, runs: int, top: int) -> str:
  """The per-kind and per-op table of a trace (times per run)."""
  decl, bodies, computation = {}, collections.defaultdict(str), None
  for line in hlo.split('\n'):
    if line and not line.startswith(' ') and line.endswith('{'):
      computation = line.split(' ')[0].lstrip('%')
    m = re.match(r'^\s+(?:ROOT )?%?([\w.\-]+) = (\S+) (.*)', line)
    if m:
      bodies[computation] += line
      meta = re.search(r'op_name="([^"]*)"', m.group(3))
      called = re.search(r'calls=%?([\w.\-]+)', m.group(3))
      decl[m.group(1)] = (m.group(2), meta.group(1) if meta else '', m.group(3),
                          called.group(1) if called else '')
  trace = glob.glob(f'{trace_dir}/**/*.trace.json.gz', recursive=True)[0]
  per_op = collections.Counter()
  for event in json.load(gzip.open(trace))['traceEvents']:
    if event.get('ph') == 'X' and not event['name'].startswith(_RUNTIME):
      per_op[event['name']] += event['dur'] / 1e3 / runs
  kinds = collections.Counter()
  for name, ms in per_op.items():
    _, meta, rest, called = decl.get(name, ('', '', '', ''))
    kind = name.split('.')[0]
    if kind.endswith('_fusion') and 'kCustom' in rest:  # A library call (YNNPACK, oneDNN).
      kind = 'conv' if 'convolution(' in bodies[called] else 'matmul/reduce'
    elif 'transpose' in kind or kind.startswith('copy'):
      kind = 'layout copy'
    elif kind.endswith('fusion') or kind.startswith('wrapped'):
      kind = 'elementwise'
    kinds[kind + (' (backward)' if 'transpose(' in meta else '')] += ms
  total = sum(per_op.values())
  lines = [f'op time per run: {total:.1f} ms', '', 'by kind:']
  lines += [f'  {ms:9.1f} ms {100 * ms / total:5.1f}%  {kind}' for kind, ms in kinds.most_common()]
  lines += ['', f'top {top} ops:']
  for name, ms in per_op.most_common(top):
    shape, meta, _, _ = decl.get(name, ('?', '', '', ''))
    lines.append(f'  {ms:8.2f} ms  {name:26s} {shape:30s} {meta[-80:]}')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('target', choices=sorted(TARGETS))
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--top', type=int, default=30)
  args = parser.parse_args()
  run, lower = TARGETS[args.target](args.batch)
  run()
  hlo = lower().compile().as_text()
  run()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.runs):
        run()
    print(op_table(trace_dir, hlo, args.runs, args.top))


if __name__ == '__main__':
  main()
