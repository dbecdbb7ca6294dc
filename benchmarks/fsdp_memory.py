"""Per-device memory of a training step: data parallel vs FSDP, with and without remat.

  python benchmarks/fsdp_memory.py [--models cifar10,ldm,sd] [--layouts data,fsdp]
      [--remat off,on] [--dtype float32|bfloat16] [--per-device-batch 4] [--devices 8]
      [--out runs/fsdp_memory]

Nothing is run and no weights are made: every train step is compiled abstractly
(jax.eval_shape for the state, jax.ShapeDtypeStruct inputs carrying their shardings)
for N fake CPU devices (--xla_force_host_platform_device_count), and XLA's buffer
assignment (`compiled.memory_analysis()`, per device: the SPMD program is one
device's) gives argument, output, alias (donated state reused for the new state)
and temporary bytes. Peak ~ argument + output - alias + temp.

Layouts of the N devices (common.mesh): `data` = mesh data=N, fsdp=1 (state
replicated, plain data parallelism); `fsdp` = data=1, fsdp=N (params, EMA and Adam
moments split over the devices, arrays under params.min_shard_size elements whole).
The state is exactly the trainers' (ddpm.train.new_state: params, EMA, Adam state
of the trainable parameters, step, rng), Adam with global-norm clipping as the
configs set it. Models:

  cifar10  ddpm/configs/cifar10.py's pixel U-Net, 32x32x3, the trainer's own step
           (ddpm.train.train_step: uint8 batch, flips, dropout 0.1).
  ldm      the conditional U-Net of latent/configs/ldm_anime_text.py on its 16x16x4
           latents (64 px / VAE factor 4, 4 channels), context [B, max_length=16,
           conditioning.width]; the U-Net only (no text encoder), ddpm's denoising loss.
  sd       a Stable-Diffusion-1.x-sized ConditionalUNet (320/640/1280/1280, 2 layers,
           attention at 64/32/16, head_dim 40) on 64x64x4 latents, context [B, 77, 768];
           optimiser/EMA/diffusion settings of ldm_anime_text. Never materialised.

Results are merged into OUT/results.json (keyed by model, layout, remat, dtype,
batch, devices) after every compile, and OUT/results.md is rewritten from it, so
separate invocations (e.g. one SD variant at a time) accumulate.

Caveat: the numbers are the XLA:CPU compiler's buffer assignment. A GPU build
fuses differently and adds convolution workspace (cuDNN), and XLA:CPU computes
some bfloat16 ops in float32, so treat GPU peaks as approximate (state bytes are
exact).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

GIB = 2**30
MODELS = ('cifar10', 'ldm', 'sd')
LAYOUTS = ('data', 'fsdp')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--models', default=','.join(MODELS), help=f'subset of {",".join(MODELS)}')
  p.add_argument('--layouts', default=','.join(LAYOUTS), help='subset of data,fsdp')
  p.add_argument('--remat', default='off,on', help='subset of off,on')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='compute dtype of the U-Nets (params stay float32)')
  p.add_argument('--per-device-batch', type=int, default=4)
  p.add_argument('--devices', type=int, default=8)
  p.add_argument('--budget-gib', type=float, default=16.0, help='the "fits" threshold')
  p.add_argument('--out', default='runs/fsdp_memory')
  p.add_argument('--fresh', action='store_true', help='discard earlier results in OUT')
  p.add_argument('--cpu-barrier-expander', action='store_true',
                 help="leave XLA:CPU's cse_barrier_expander on (remat then saves nothing on CPU)")
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(',') if m]
  args.layouts = [m for m in args.layouts.split(',') if m]
  args.remat = [r == 'on' for r in args.remat.split(',') if r]
  for m in args.models:
    if m not in MODELS:
      p.error(f'unknown model {m!r}; valid: {", ".join(MODELS)}')
  for m in args.layouts:
    if m not in LAYOUTS:
      p.error(f'unknown layout {m!r}; valid: {", ".join(LAYOUTS)}')
  return args


ARGS = parse_args() if __name__ == '__main__' else None
if ARGS is not None:  # Before jax is imported.
  # XLA:CPU expands jax.checkpoint's optimization barriers early in its pipeline, after which
  # CSE and the scheduler undo rematerialisation (remat on/off compile to the same memory).
  # GPU/TPU keep the barriers; keeping them on CPU too (the pass off) makes remat count here.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={ARGS.devices}' +
                             ('' if ARGS.cpu_barrier_expander else
                              ' --xla_disable_hlo_passes=cse_barrier_expander')).strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import functools  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import mesh as mesh_lib, optim  # pylint: disable=wrong-import-position
from ddpm import diffusion, train as ddpm_train  # pylint: disable=wrong-import-position
from ddpm.configs import cifar10  # pylint: disable=wrong-import-position
from latent.configs import ldm_anime_text  # pylint: disable=wrong-import-position
from latent.ldm.unet import ConditionalUNet  # pylint: disable=wrong-import-position

LDM_VAE_FACTOR, LDM_LATENT_CHANNELS = 4, 4
SD_CONTEXT = (77, 768)


def log(msg):
  print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


# -- the train steps ----------------------------------------------------------------------

def conditional_train_step(state, batch, *, config, model, schedule, tx, rules):
  """One step of a conditional U-Net on latents {'z0' [B, h, w, c], 'context' [B, L, D]}:
  latent/ldm/train.py's step without the VAE, the text encoder and condition dropout."""
  rng = jax.random.fold_in(state.rng, state.step)
  loss_rng, dropout_rng = jax.random.split(rng)
  z0 = batch['z0']
  t, eps = diffusion.draw_t_eps(schedule, loss_rng, z0)

  def loss_fn(params, mb, dropout_rng):  # Masks per example (optim.value_and_grad's rng).
    model_fn = lambda zt, t: model.apply({'params': params}, zt, t, train=True,
                                         context=mb['context'], rngs={'dropout': dropout_rng})
    return diffusion.denoising_loss(schedule, model_fn, mb['z0'], mb['t'], mb['eps'],
                                    config.diffusion.prediction, config.diffusion.min_snr_gamma)

  (loss, aux), grads = optim.value_and_grad(
      loss_fn, state.params, rules, {'z0': z0, 'context': batch['context'], 't': t, 'eps': eps},
      config.train.grad_accum_steps, rng=dropout_rng)
  metrics = {'loss': loss, 'mse': aux['mse'], 'grad_norm': optax.global_norm(grads)}
  return ddpm_train.apply_gradients(state, grads, tx, config.train, rules), metrics


def compute_dtype(name):
  return jnp.bfloat16 if name == 'bfloat16' else jnp.float32


def setup(name: str, remat: bool, dtype: str, global_batch: int):
  """(config, model, step_fn, init_fn -> TrainState, abstract batch without shardings)."""
  if name == 'cifar10':
    config = cifar10.get_config()
    config.model.remat = remat
    config.model.dtype = dtype
    config.train.batch_size = global_batch
    model = ddpm_train.build_model(config)
    size = config.data.image_size
    batch = jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.uint8)
    rules = ddpm_train.rules_of(config)
    tx = ddpm_train.make_optimizer(config, rules)
    schedule = ddpm_train.build_schedule(config)
    step = functools.partial(ddpm_train.train_step, config=config, model=model,
                             schedule=schedule, tx=tx, rules=rules)
    init = functools.partial(ddpm_train.init_state, config, model, tx, rules)
    return config, model, step, init, batch

  config = ldm_anime_text.get_config()
  config.train.batch_size = global_batch
  m = config.model
  if name == 'ldm':
    model = ConditionalUNet(
        sample_size=config.data.image_size // LDM_VAE_FACTOR,
        in_channels=LDM_LATENT_CHANNELS, out_channels=LDM_LATENT_CHANNELS,
        block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
        attention_resolutions=tuple(m.attention_resolutions), head_dim=m.head_dim,
        mid_attention=m.mid_attention, norm_groups=m.norm_groups, dropout=m.dropout,
        dtype=compute_dtype(dtype), transformer_depth=m.transformer_depth, remat=remat)
    context = (config.conditioning.max_length, config.conditioning.width)
  else:  # Stable Diffusion 1.x's UNet2DConditionModel shape.
    model = ConditionalUNet(
        sample_size=64, in_channels=4, out_channels=4,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        attention_resolutions=(64, 32, 16), head_dim=40, norm_groups=32,
        transformer_depth=1, dtype=compute_dtype(dtype), remat=remat)
    context = SD_CONTEXT
  s, c = model.sample_size, model.in_channels
  batch = {'z0': jax.ShapeDtypeStruct((global_batch, s, s, c), jnp.float32),
           'context': jax.ShapeDtypeStruct((global_batch, *context), jnp.float32)}
  rules = ddpm_train.rules_of(config)
  tx = ddpm_train.make_optimizer(config, rules)
  schedule = ddpm_train.build_schedule(config)
  step = functools.partial(conditional_train_step, config=config, model=model,
                           schedule=schedule, tx=tx, rules=rules)

  def init():
    rng = jax.random.PRNGKey(config.seed)
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, s, s, c)), jnp.zeros((1,), jnp.int32),
                        context=jnp.zeros((1, *context)))['params']
    return ddpm_train.new_state(params, tx, rules, state_rng)

  return config, model, step, init, batch


# -- one variant --------------------------------------------------------------------------

def shard_bytes(abstract, shardings) -> int:
  """Bytes one device holds of `abstract` laid out by `shardings`."""
  total = 0
  for a, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    total += int(np.prod(sh.shard_shape(a.shape), dtype=np.int64)) * a.dtype.itemsize
  return total


def with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                      abstract, shardings)


def measure(name, layout, remat, args):
  n = args.devices
  global_batch = args.per_device_batch * n
  fsdp = n if layout == 'fsdp' else 1
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({'fsdp': fsdp}), jax.devices()[:n])
  config, _, step, init, batch = setup(name, remat, args.dtype, global_batch)
  rules = ddpm_train.rules_of(config)

  t0 = time.perf_counter()
  abstract = jax.eval_shape(init)
  state_sh = mesh_lib.state_shardings(abstract, mesh, rules)
  batch_sh = jax.tree.map(lambda _: mesh_lib.data_sharding(mesh), batch)
  t_shape = time.perf_counter() - t0
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))

  jitted = jax.jit(step, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, mesh_lib.replicated(mesh)), donate_argnums=0)
  t0 = time.perf_counter()
  lowered = jitted.lower(with_shardings(abstract, state_sh), with_shardings(batch, batch_sh))
  t_lower = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  t_compile = time.perf_counter() - t0
  ma = compiled.memory_analysis()

  arg, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
  alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
  state_bytes = shard_bytes(abstract, state_sh)
  return {
      'model': name, 'layout': layout, 'mesh': {'data': n // fsdp, 'fsdp': fsdp},
      'remat': remat, 'dtype': args.dtype, 'per_device_batch': args.per_device_batch,
      'global_batch': global_batch, 'devices': n, 'num_params': num_params,
      'param_bytes_full': sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.params)),
      'state_bytes_full': sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)),
      'state_bytes_per_device': state_bytes,
      'batch_bytes_per_device': shard_bytes(batch, batch_sh),
      'argument_bytes': arg, 'output_bytes': out, 'alias_bytes': alias, 'temp_bytes': temp,
      'generated_code_bytes': ma.generated_code_size_in_bytes,
      'peak_bytes': arg + out - alias + temp,
      'seconds': {'eval_shape': round(t_shape, 2), 'lower': round(t_lower, 2),
                  'compile': round(t_compile, 2)},
      'jax': jax.__version__, 'backend': jax.default_backend(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'measured_at': time.strftime('%Y-%m-%d %H:%M:%S'),
  }


# -- results ------------------------------------------------------------------------------

def key(r):
  return f"{r['model']}|{r['layout']}|{'remat' if r['remat'] else 'noremat'}|{r['dtype']}|" \
         f"b{r['per_device_batch']}|n{r['devices']}"


def gib(b):
  return b / GIB


def markdown(results, args, command):
  budget = args.budget_gib * GIB
  order = {m: i for i, m in enumerate(MODELS)}
  rows = sorted(results.values(), key=lambda r: (r['dtype'], r['devices'], r['per_device_batch'],
                                                 order[r['model']], r['layout'], r['remat']))
  names = {'cifar10': 'cifar10 pixel U-Net (32x32x3)', 'ldm': 'ldm_anime_text U-Net (16x16x4)',
           'sd': 'SD-1.x-sized U-Net (64x64x4, ctx 77x768)'}
  lines = [
      '# Per-device memory of a training step: data parallel vs FSDP',
      '',
      'Command(s) (results accumulate over runs into OUT/results.json):',
      '',
      *sorted({f"    {r.get('command', command)}" for r in rows}),
      '',
      'Compiled abstractly for fake CPU devices (XLA:CPU buffer assignment, '
      '`compiled.memory_analysis()`, per device). State = params + EMA + Adam (mu, nu) + '
      'step + rng, float32. Peak = argument + output - alias + temp. '
      f'"Fits" = peak <= {args.budget_gib:g} GiB. GPU builds fuse differently and add '
      'cuDNN workspace: peaks are estimates, state bytes exact. XLA:CPU runs with '
      '`--xla_disable_hlo_passes=cse_barrier_expander` (as GPU/TPU, it keeps '
      "jax.checkpoint's optimization barriers; with the pass on, CSE and the scheduler "
      'undo remat on CPU and remat on/off compile to the same memory).',
      '',
      '| model | params | devices | layout (mesh) | remat | dtype | batch/dev | state GiB/dev '
      '| temp GiB/dev | peak GiB/dev | fits | compile s |',
      '|---|---:|---:|---|---|---|---:|---:|---:|---:|---|---:|',
  ]
  for r in rows:
    mesh = f"{r['layout']} (data={r['mesh']['data']}, fsdp={r['mesh']['fsdp']})"
    lines.append(
        f"| {names[r['model']]} | {r['num_params']:,} | {r['devices']} | {mesh} | "
        f"{'on' if r['remat'] else 'off'} | {r['dtype']} | {r['per_device_batch']} | "
        f"{gib(r['state_bytes_per_device']):.3f} | {gib(r['temp_bytes']):.3f} | "
        f"{gib(r['peak_bytes']):.3f} | {'yes' if r['peak_bytes'] <= budget else 'NO'} | "
        f"{r['seconds']['compile']:.0f} |")

  groups = sorted({(r['dtype'], r['devices'], r['per_device_batch']) for r in rows})
  lines += ['', f'## Largest model that fits {args.budget_gib:g} GiB, each way', '',
            '| dtype | devices | batch/dev | layout | remat | largest fitting (params) | '
            'not measured |', '|---|---:|---:|---|---|---|---|']
  for dtype, n, b in groups:
    for layout in LAYOUTS:
      for remat in (False, True):
        got = {r['model']: r for r in rows if (r['dtype'], r['devices'], r['per_device_batch'],
                                              r['layout'], r['remat']) == (dtype, n, b, layout,
                                                                           remat)}
        if not got:
          continue
        fits = [r for r in got.values() if r['peak_bytes'] <= budget]
        best = max(fits, key=lambda r: r['num_params']) if fits else None
        missing = [m for m in MODELS if m not in got]
        lines.append(f"| {dtype} | {n} | {b} | {layout} | {'on' if remat else 'off'} | "
                     + (f"{best['model']} ({best['num_params'] / 1e6:.1f}M)" if best else 'none')
                     + f" | {', '.join(missing) or '-'} |")

  lines += ['', '## State bytes per device, fsdp / data', '',
            '| model | dtype | devices | state GiB/dev data | state GiB/dev fsdp | ratio |',
            '|---|---|---:|---:|---:|---:|']
  for dtype, n, b in groups:
    for m in MODELS:
      pick = {(r['layout']): r for r in rows if (r['model'], r['dtype'], r['devices'],
                                                 r['per_device_batch']) == (m, dtype, n, b)}
      if 'data' in pick and 'fsdp' in pick:
        d, f = pick['data']['state_bytes_per_device'], pick['fsdp']['state_bytes_per_device']
        lines.append(f'| {m} | {dtype} | {n} | {gib(d):.3f} | {gib(f):.3f} | {f / d:.4f} '
                     f'(1/{d / f:.2f}) |')
  return '\n'.join(lines) + '\n'


def main():
  args = ARGS
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / 'results.json'
  results = {} if args.fresh or not path.exists() else json.loads(path.read_text())
  command = 'python benchmarks/fsdp_memory.py ' + ' '.join(sys.argv[1:])
  log(f'jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices; '
      f'models={args.models} layouts={args.layouts} remat={args.remat} dtype={args.dtype} '
      f'batch/device={args.per_device_batch}')
  for name in args.models:
    for layout in args.layouts:
      for remat in args.remat:
        tag = f"{name} {layout} remat={'on' if remat else 'off'} {args.dtype}"
        log(f'{tag}: compiling ...')
        t0 = time.perf_counter()
        try:
          r = measure(name, layout, remat, args)
        except Exception as e:  # pylint: disable=broad-except
          log(f'{tag}: FAILED after {time.perf_counter() - t0:.0f} s: {type(e).__name__}: {e}')
          continue
        s = r['seconds']
        log(f"{tag}: {r['num_params']:,} params; eval_shape {s['eval_shape']:.1f} s, lower "
            f"{s['lower']:.1f} s, compile {s['compile']:.1f} s; per device: state "
            f"{gib(r['state_bytes_per_device']):.3f} GiB, args {gib(r['argument_bytes']):.3f}, "
            f"temp {gib(r['temp_bytes']):.3f}, out {gib(r['output_bytes']):.3f}, alias "
            f"{gib(r['alias_bytes']):.3f}, peak {gib(r['peak_bytes']):.3f} GiB")
        r['command'] = command
        results[key(r)] = r
        path.write_text(json.dumps(results, indent=1, sort_keys=True))
        (out / 'results.md').write_text(markdown(results, args, command))
  print(markdown(results, args, command), flush=True)


if __name__ == '__main__':
  main()
