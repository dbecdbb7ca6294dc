"""LoRA (Hu et al. 2021) for every model here, as a transformation of its parameter tree.

An adapted layer keeps its frozen kernel W and gains, beside it in the same
parameter dict, `lora_A` [in, r] (or [kh, kw, in, r] for a convolution),
`lora_B` [r, out] (zero-initialised, so the adapter starts as an exact no-op)
and `lora_scale` (alpha / r). The layer computes

    y = x W + scale * (x A) B          (a convolution: conv(x, A), then a 1x1 conv B)

Training: the parameter rules (common.params) train `lora_A`/`lora_B` only, e.g.
`params.trainable = (('.*/lora_[AB]', True), ('.*', False))`, and the trainers
apply the model to `merged(params)`, i.e. W + scale * A B, whose gradient with respect to
A and B is that of the two-branch form. `enabled()` evaluates the two-branch form itself
(what the tests compare). Sampling folds any number of adapters, each at its own
strength, into the base (`merge_adapters`). `to_peft`/`from_peft` convert to and from
PEFT's LoRA state dicts (`<module>.lora_A.weight` [r, in], `lora_B.weight` [out, r]; what
diffusers' `load_lora_weights` reads), with the module names of `ddpm.convert`.

The scale lives in the tree as the non-trainable `lora_scale` leaf (PEFT's `scaling`), never
in B: A and B are the trained factors everywhere, in the tree and in the files. A file
carries the alphas in its metadata as PEFT does (`lora_alpha`, `alpha_pattern` for modules
whose alpha differs; `alphas`), and kohya's `ss_network_dim`/`ss_network_alpha`; `load`
reads them back (or kohya's per-module `<module>.alpha` tensors), so the scale is exact
both ways. A reader that ignores the metadata (diffusers releases from before its
`lora_adapter_metadata`; loaders that look only for `<module>.alpha` tensors) applies
scale 1, i.e. alpha = r: the same file as before when alpha = r (the default).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from common import atomic, errors
from common import params as params_lib

A, B, SCALE = 'lora_A', 'lora_B', 'lora_scale'
LEAVES = (A, B, SCALE)
# Attention projections of the U-Nets (ddpm's self-attention, latent's transformers).
DEFAULT_TARGETS = r'.*/(to_q|to_k|to_v|to_out_0)'
# Top-level parts of a diffusers pipeline whose LoRA keys a file may hold.
PIPELINE_COMPONENTS = ('unet', 'text_encoder', 'text_encoder_2', 'transformer')
# The safetensors metadata key of PEFT's LoraConfig fields (diffusers' LORA_ADAPTER_METADATA_KEY).
LORA_METADATA = 'lora_adapter_metadata'


def add(params, rng: jax.Array, rank: int = 4, alpha: float | None = None,
        targets: str = DEFAULT_TARGETS) -> dict:
  """`params` with a rank-`rank` adapter on every Dense/Conv module whose path matches
  `targets` (a regex over module paths as common.params writes them, e.g.
  'down_blocks_1/attentions_0/to_q'). alpha defaults to rank (scale 1).

  A is initialised as PEFT does (Kaiming-uniform, bound 1/sqrt(fan_in)), B with zeros.
  """
  regex = re.compile(targets)
  flat = flax.traverse_util.flatten_dict(params)
  out = dict(flat)
  matched, modules = [], []
  for key, w in flat.items():
    if key[-1] != 'kernel' or w.ndim not in (2, 4):
      continue
    modules.append(params_lib.path_str(key[:-1]))
    if not regex.fullmatch(modules[-1]):
      continue
    module = key[:-1]
    if module + (A,) in flat:
      raise errors.ConfigError(f'{params_lib.path_str(module)} already has a LoRA adapter.')
    fan_in = int(np.prod(w.shape[:-1]))
    bound = 1.0 / math.sqrt(fan_in)
    rng, key_a = jax.random.split(rng)
    out[module + (A,)] = jax.random.uniform(key_a, (*w.shape[:-1], rank), jnp.float32,
                                            -bound, bound)
    out[module + (B,)] = jnp.zeros((rank, w.shape[-1]), jnp.float32)
    out[module + (SCALE,)] = jnp.asarray((alpha or rank) / rank, jnp.float32)
    matched.append(params_lib.path_str(module))
  example = f' (module paths look like {modules[0]!r})' if modules else ''
  if not matched:
    raise errors.ConfigError(f'LoRA targets {targets!r} match no Dense or Conv module{example}.')
  missing = params_lib.unmatched_alternatives(targets, modules)
  if missing:
    raise errors.ConfigError(
        f'LoRA targets {targets!r}: the alternative{"s" * (len(missing) > 1)} '
        f'{", ".join(map(repr, missing))} match{"es" * (len(missing) == 1)} no Dense or Conv '
        f'module{example}.')
  return flax.traverse_util.unflatten_dict(out)


def has_adapters(params) -> bool:
  return any(k[-1] == A for k in flax.traverse_util.flatten_dict(params))


def delta(a, b, scale):
  """scale * A B as a kernel-shaped update: [in, out] or [kh, kw, in, out]."""
  return scale * jnp.tensordot(a, b, axes=1)


def split(params) -> tuple[dict, dict]:
  """(base parameters, adapter) of a tree holding one adapter."""
  flat = flax.traverse_util.flatten_dict(params)
  base = {k: v for k, v in flat.items() if k[-1] not in LEAVES}
  adapter = {k: v for k, v in flat.items() if k[-1] in LEAVES}
  return flax.traverse_util.unflatten_dict(base), flax.traverse_util.unflatten_dict(adapter)


def merge_adapters(base, adapters: Iterable[tuple[Any, float]]) -> dict:
  """`base` with each (adapter, strength) folded in: W + sum_i strength_i * scale_i A_i B_i."""
  flat = dict(flax.traverse_util.flatten_dict(base))
  for adapter, strength in adapters:
    ad = flax.traverse_util.flatten_dict(adapter)
    for key in ad:
      if key[-1] != A:
        continue
      module = key[:-1]
      kernel = flat.get(module + ('kernel',))
      if kernel is None:
        raise errors.ConfigError(
            f'The adapter has weights for {params_lib.path_str(module)}, which this model '
            'does not have: it was trained for another architecture.')
      update = delta(ad[key], ad[module + (B,)], strength * ad[module + (SCALE,)])
      if update.shape != kernel.shape:
        raise errors.ConfigError(f'The adapter for {params_lib.path_str(module)} makes a '
                                 f'{update.shape} update for a {kernel.shape} kernel.')
      flat[module + ('kernel',)] = kernel + update.astype(kernel.dtype)
  return flax.traverse_util.unflatten_dict(flat)


def merged(params, strength: float = 1.0) -> dict:
  """The plain parameters of a tree with an adapter (itself if it has none): differentiable
  in A and B, so training can apply the model to `merged(params)`."""
  if not has_adapters(params):
    return params
  base, adapter = split(params)
  return merge_adapters(base, [(adapter, strength)])


def _interceptor(next_fun, args, kwargs, context):
  """The two-branch forward of an adapted nn.Dense / nn.Conv (see `enabled`)."""
  module = context.module
  y = next_fun(*args, **kwargs)
  if (context.method_name != '__call__' or not isinstance(module, (nn.Dense, nn.Conv))
      or not module.has_variable('params', A)):
    return y
  x = args[0]
  a, b = module.get_variable('params', A), module.get_variable('params', B)
  scale = module.get_variable('params', SCALE)
  dtype = module.dtype or x.dtype
  if isinstance(module, nn.Dense):
    h = jnp.dot(x.astype(dtype), a.astype(dtype))
  else:
    strides = module.strides or (1,) * (a.ndim - 2)
    strides = (strides,) * (a.ndim - 2) if isinstance(strides, int) else tuple(strides)
    padding = module.padding
    if not isinstance(padding, str):
      padding = [tuple(p) if not isinstance(p, int) else (p, p) for p in padding]
    h = jax.lax.conv_general_dilated(x.astype(dtype), a.astype(dtype), strides, padding,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y + (scale * jnp.dot(h, b.astype(dtype))).astype(y.dtype)


@contextlib.contextmanager
def enabled():
  """Within this context, `model.apply` on parameters with adapters computes
  x W + scale (x A) B in every adapted layer (without it, adapters are ignored)."""
  with nn.intercept_methods(_interceptor):
    yield


# --- PEFT / diffusers state dicts -----------------------------------------------------------

def _alpha(scale, rank: int) -> float | int:
  """alpha = scale * r from the float32 scale, to the 6 significant digits a config holds
  (alpha / r then gives back the very scale); an int when whole, as PEFT configs write it."""
  alpha = float(f'{float(np.float32(scale)) * rank:.6g}')
  return int(alpha) if alpha.is_integer() else alpha


def alphas(adapter, prefix: str = '') -> dict[str, float | int]:
  """{PEFT module name: alpha} of an adapter (or of parameters holding one): what PEFT's
  `lora_alpha`/`alpha_pattern` record, the scale being alpha / r."""
  flat = flax.traverse_util.flatten_dict(adapter)
  return {prefix + params_lib.torch_module_name(k[:-1]): _alpha(flat[k[:-1] + (SCALE,)],
                                                               int(v.shape[-1]))
          for k, v in flat.items() if k[-1] == A}


def to_peft(adapter, prefix: str = '') -> dict[str, np.ndarray]:
  """PEFT's LoRA state dict of an adapter (or of parameters holding one): A and B as they
  are, unscaled, as PEFT keeps them; the scale goes with `alphas(adapter)` (PEFT's
  lora_alpha / alpha_pattern: what `save` writes into the file's metadata).
  """
  flat = flax.traverse_util.flatten_dict(adapter)
  out = {}
  for key, a in flat.items():
    if key[-1] != A:
      continue
    module = key[:-1]
    b = np.asarray(flat[module + (B,)], np.float32)
    a = np.asarray(a, np.float32)
    name = prefix + params_lib.torch_module_name(module)
    if a.ndim == 2:
      out[f'{name}.lora_A.weight'] = a.T                          # [r, in]
      out[f'{name}.lora_B.weight'] = b.T                          # [out, r]
    else:
      out[f'{name}.lora_A.weight'] = a.transpose(3, 2, 0, 1)      # HWIO -> [r, in, kh, kw]
      out[f'{name}.lora_B.weight'] = b.T[:, :, None, None]        # [out, r, 1, 1]
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_peft(state_dict: dict[str, np.ndarray], params, prefix: str = '',
              alpha: float | Mapping[str, float] | None = None) -> dict:
  """An adapter for `params` from a PEFT/diffusers LoRA state dict, each module's scale
  alpha / r. `alpha`: one value for every module, or {module name as the state dict
  writes it: alpha} (`alphas`, or a file's metadata: `metadata_alphas`); a module it does
  not name takes the state dict's kohya-style `<module>.alpha` if there is one, else r
  (PEFT's default when nothing gives an alpha). Keys naming no layer of `params`, or shapes
  that do not fit it, are a ConfigError naming the first few."""
  kernels = {params_lib.torch_module_name(k[:-1]): (k[:-1], v.shape)
             for k, v in flax.traverse_util.flatten_dict(params).items() if k[-1] == 'kernel'}
  out, unknown, misfit = {}, [], []
  for key, value in state_dict.items():
    if not key.endswith('.lora_A.weight'):
      continue
    name = key[:-len('.lora_A.weight')]
    if not name.startswith(prefix) or name[len(prefix):] not in kernels:
      unknown.append(name)
      continue
    module, shape = kernels[name[len(prefix):]]
    a, b = np.asarray(value, np.float32), np.asarray(state_dict[f'{name}.lora_B.weight'], np.float32)
    if a.ndim == 2:
      a, b = a.T, b.T
    else:
      a, b = a.transpose(2, 3, 1, 0), b[:, :, 0, 0].T
    if a.shape[:-1] != shape[:-1] or b.shape != (a.shape[-1], shape[-1]):
      misfit.append(f'{name} (A {a.shape}, B {b.shape} for a {shape} kernel)')
      continue
    rank = a.shape[-1]
    given = alpha.get(name) if isinstance(alpha, Mapping) else alpha
    if given is None and f'{name}.alpha' in state_dict:
      given = float(np.asarray(state_dict[f'{name}.alpha']))
    out[module + (A,)], out[module + (B,)] = a, b
    out[module + (SCALE,)] = np.float32((given or rank) / rank)
  if unknown or misfit:
    problems = ([f'{len(unknown)} name no layer of this model: {", ".join(unknown[:3])}']
                if unknown else []) + (
                    [f'{len(misfit)} do not fit its shapes: {"; ".join(misfit[:3])}']
                    if misfit else [])
    raise errors.ConfigError(f'LoRA weights that {" and ".join(problems)}. The adapter was '
                             'trained for another model.')
  if not out:
    raise errors.ConfigError('The state dict holds no LoRA weights (no *.lora_A.weight keys).')
  return flax.traverse_util.unflatten_dict(out)


def _pattern_key(patterns: Iterable[str], name: str) -> str | None:
  """The first PEFT rank/alpha pattern naming module `name` (peft.utils.other's
  get_pattern_key: the pattern matches a '.'-separated suffix of the name)."""
  return next((p for p in patterns if re.match(rf'(.*\.)?({p})$', name)), None)


def metadata_alphas(metadata: Mapping[str, str] | None, names: Iterable[str]) -> dict[str, float]:
  """{module name: alpha} from a LoRA file's safetensors metadata (PEFT's LoraConfig fields
  in `lora_adapter_metadata`, as diffusers and `save` write them, under each pipeline
  component's prefix, 'unet.lora_alpha'); the names it does not cover are left out."""
  text = (metadata or {}).get(LORA_METADATA)
  if not text:
    return {}
  try:
    config = json.loads(text)
  except ValueError:
    return {}
  if not isinstance(config, dict):
    return {}
  out = {}
  for name in names:
    component = name.split('.')[0] + '.'
    if f'{component}lora_alpha' not in config and f'{component}r' not in config:
      component = ''
    pattern = config.get(f'{component}alpha_pattern') or {}
    key = _pattern_key(pattern, name[len(component):])
    value = pattern[key] if key is not None else config.get(f'{component}lora_alpha')
    if value is not None:
      out[name] = float(value)
  return out


def _common(values: dict[str, Any]):
  """The most frequent value (PEFT's r / lora_alpha; the pattern holds the others)."""
  values = list(values.values())
  return max(dict.fromkeys(values), key=values.count)


def save(path: str | Path, adapter, prefix: str = '') -> Path:
  """Writes the adapter as PEFT-format safetensors (diffusers' pytorch_lora_weights layout):
  A and B as trained, the alphas in the metadata (PEFT's `lora_alpha`/`alpha_pattern`,
  which diffusers' `load_lora_weights` reads; kohya's `ss_network_alpha`)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  flat = flax.traverse_util.flatten_dict(adapter)
  ranks = {prefix + params_lib.torch_module_name(k[:-1]): int(v.shape[-1])
           for k, v in flat.items() if k[-1] == A}
  module_alphas = alphas(adapter, prefix)
  # The component the keys live under ('unet.' of a pipeline's LoRA file): diffusers'
  # loader reads the metadata under that prefix, module names relative to it.
  firsts = {name.split('.')[0] for name in ranks}
  component = ''
  if len(firsts) == 1 and (prefix or next(iter(firsts)) in PIPELINE_COMPONENTS):
    component = next(iter(firsts)) + '.'
  ranks = {name[len(component):]: r for name, r in ranks.items()}
  module_alphas = {name[len(component):]: a for name, a in module_alphas.items()}
  rank, alpha = _common(ranks), _common(module_alphas)
  # PEFT's LoraConfig fields, which diffusers' loader reads (scale alpha / r per module).
  config = {'r': rank, 'lora_alpha': alpha, 'target_modules': sorted(ranks),
            'rank_pattern': {m: r for m, r in ranks.items() if r != rank},
            'alpha_pattern': {m: a for m, a in module_alphas.items() if a != alpha}}
  config = {f'{component}{k}': v for k, v in config.items()}
  # kohya's training metadata (sd-scripts' ss_network_dim / ss_network_alpha).
  kohya = {'ss_network_dim': str(rank), 'ss_network_alpha': str(alpha)}
  tensors = to_peft(adapter, prefix)
  metadata = {'format': 'pt', LORA_METADATA: json.dumps(config), **kohya}
  return atomic.write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load(path: str | Path, params, prefix: str = '') -> dict:
  """An adapter for `params` from a PEFT/diffusers LoRA .safetensors file, each module at
  the alpha its metadata gives (`metadata_alphas`; else a `<module>.alpha` tensor; else r)."""
  path = Path(path)
  if not path.is_file():
    raise errors.MissingFileError(f'LoRA file {path} does not exist.')
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  with safe_open(str(path), framework='numpy') as f:
    metadata = f.metadata()
  state = load_file(str(path))
  names = [k[:-len('.lora_A.weight')] for k in state if k.endswith('.lora_A.weight')]
  try:
    return from_peft(state, params, prefix, metadata_alphas(metadata, names))
  except errors.ConfigError as e:
    raise errors.ConfigError(f'{path}: {e}') from None


def apply_files(params, specs: Iterable[str], key: str = 'sample.adapters') -> dict:
  """`params` with the LoRA files of `specs` ('PATH[:STRENGTH]', e.g. from
  --config.sample.adapters) folded in, each at its strength."""
  from common import config as config_lib  # pylint: disable=g-import-not-at-top
  adapters = []
  for i, spec in enumerate(specs):
    path, strength = config_lib.parse_weighted_path(spec, f'{key}[{i}]')
    adapters.append((load(path, params), strength))
    logging.info('LoRA adapter %s at strength %g.', path, strength)
  return merge_adapters(params, adapters) if adapters else params
