"""Hypernetworks (the Stable Diffusion community's kind: NovelAI, AUTOMATIC1111's web UI).

Small residual MLPs on the cross-attention context, one for the keys and one for
the values, per context width D:

    k = to_k(c + MLP_k(c)),    v = to_v(c + MLP_v(c))

Each MLP maps D -> m_1 D -> ... -> D (`multipliers`, default (1, 2, 1)) with ReLU
between layers; its last layer starts at zero, so an untrained hypernetwork is an
exact no-op. The MLPs live in the parameter tree beside the frozen model, under
`hypernetwork/<D>/{k,v}/linear_<i>/{kernel,bias}`, so the parameter rules train them
alone; `applied(params)` runs the model with them through a Flax method interceptor on
the cross-attention `to_k`/`to_v` layers, so no network code changes.

File format (`save`/`load`): safetensors with keys `<D>.<k|v>.linear.<i>.weight`
([out, in], torch's layout) and `.bias`, and metadata `layer_structure` (the
multipliers, JSON) and `activation_func` ('relu'), the fields of the web UI's .pt files.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import atomic, config as config_lib, errors

KEY = 'hypernetwork'
ACTIVATION = 'relu'


def init(rng: jax.Array, width: int, multipliers: Sequence[int] = (1, 2, 1)) -> dict:
  """{str(width): {'k': mlp, 'v': mlp}}: hidden layers LeCun-normal, the last one zero."""
  if len(multipliers) < 2 or multipliers[0] != 1 or multipliers[-1] != 1:
    raise errors.ConfigError(f'hypernetwork.multipliers={tuple(multipliers)} must start and end '
                             'with 1 (e.g. (1, 2, 1)).')
  sizes = [int(m * width) for m in multipliers]
  tree = {}
  for name, key in zip(('k', 'v'), jax.random.split(rng)):
    layers = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
      key, sub = jax.random.split(key)
      last = i == len(sizes) - 2
      kernel = (jnp.zeros((n_in, n_out)) if last
                else jax.random.normal(sub, (n_in, n_out)) / np.sqrt(n_in))
      layers[f'linear_{i}'] = {'kernel': kernel, 'bias': jnp.zeros((n_out,))}
    tree[name] = layers
  return {str(width): tree}


def mlp(layers: dict, x: jnp.ndarray) -> jnp.ndarray:
  """x + MLP(x) for one of the k/v networks."""
  h = x
  n = len(layers)
  for i in range(n):
    p = layers[f'linear_{i}']
    h = jnp.dot(h, p['kernel'].astype(x.dtype)) + p['bias'].astype(x.dtype)
    if i < n - 1:
      h = jax.nn.relu(h)
  return x + h


def scaled(tree: dict, strength: float) -> dict:
  """The hypernetwork with its residual times `strength` (its last layers scaled)."""
  out = {}
  for width, nets in tree.items():
    out[width] = {}
    for name, layers in nets.items():
      last = f'linear_{len(layers) - 1}'
      out[width][name] = {**layers, last: jax.tree.map(lambda a: a * strength, layers[last])}
  return out


@contextlib.contextmanager
def applied(params):
  """Within this context, `model.apply(params)` feeds the cross-attention to_k/to_v layers
  c + MLP(c) when `params` holds a hypernetwork (else nothing changes)."""
  tree = params.get(KEY) if isinstance(params, dict) else None
  if not tree:
    yield
    return

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == '__call__' and isinstance(module, nn.Dense)
        and module.name in ('to_k', 'to_v') and module.parent is not None
        and getattr(module.parent, 'name', None) == 'attn2'):
      nets = tree.get(str(args[0].shape[-1]))
      if nets is not None:
        args = (mlp(nets[module.name[-1]], args[0]),) + tuple(args[1:])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def save(path: str | Path, tree: dict, multipliers: Sequence[int]) -> Path:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for width, nets in tree.items():
    for name, layers in nets.items():
      for layer, p in layers.items():
        i = layer.split('_')[-1]
        tensors[f'{width}.{name}.linear.{i}.weight'] = np.ascontiguousarray(
            np.asarray(p['kernel'], np.float32).T)
        tensors[f'{width}.{name}.linear.{i}.bias'] = np.asarray(p['bias'], np.float32)
  metadata = {'layer_structure': json.dumps(list(multipliers)), 'activation_func': ACTIVATION}
  return atomic.write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load(path: str | Path, width: int | None = None) -> dict:
  """A hypernetwork tree from `save`'s file; with `width`, checks it has the model's width."""
  path = Path(path)
  if not path.is_file():
    raise errors.MissingFileError(f'Hypernetwork file {path} does not exist.')
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(str(path), 'np') as f:
      meta = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own error types for bad files.
    raise errors.DataError(f'{path} is not a safetensors hypernetwork file: {e}') from None
  if meta.get('activation_func', ACTIVATION) != ACTIVATION:
    raise errors.ConfigError(f'{path}: activation {meta["activation_func"]!r} is not supported '
                             f'(this code builds {ACTIVATION!r} hypernetworks).')
  tree: dict = {}
  for key, value in tensors.items():
    parts = key.split('.')
    if len(parts) != 5 or parts[1] not in ('k', 'v') or parts[2] != 'linear':
      raise errors.ConfigError(f'{path}: key {key!r} is not <width>.<k|v>.linear.<i>.<weight|bias>.')
    width_key, name, _, i, leaf = parts
    layer = tree.setdefault(width_key, {}).setdefault(name, {}).setdefault(f'linear_{i}', {})
    layer['kernel' if leaf == 'weight' else 'bias'] = value.T if leaf == 'weight' else value
  if width is not None and str(width) not in tree:
    raise errors.ConfigError(f'{path} holds hypernetworks for context widths '
                             f'{", ".join(sorted(tree))}; this model\'s is {width}.')
  return tree


def apply_file(params: dict, spec: str, width: int, key: str = 'sample.hypernetwork') -> dict:
  """`params` with the hypernetwork of 'PATH[:STRENGTH]' (replacing any it had)."""
  if not spec:
    return params
  path, strength = config_lib.parse_weighted_path(spec, key)
  return {**params, KEY: scaled(load(path, width), strength)}
