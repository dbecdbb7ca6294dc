"""ddpm speed against diffusers (PyTorch), measured side by side in one run.

  python benchmarks/bench_ddpm.py [--batch 16] [--repeats 5] [--rows abc] [--write]

(a) train step (forward, backward, clipping, Adam; ours also updates the EMA)
    of the `cifar10` U-Net (35.7M parameters) against diffusers' UNet2DModel
    built with the same architecture, float32, batch 16 at 32x32;
(b) DDIM-50 sampling throughput against diffusers' DDIMPipeline, same model;
(c) our DDIM-S against our DDPM-1000 wall time (the demo U-Net, so that 1000
    steps finish in reasonable time on a CPU).
Prints ratios (> 1: we are faster) and with --write replaces the `## ddpm`
section of benchmarks/RESULTS.md.
"""

import argparse
import functools
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.torch_compat import patch_torchvision  # pylint: disable=wrong-import-position

patch_torchvision()
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel  # pylint: disable=wrong-import-position

from common import mesh as mesh_lib  # pylint: disable=wrong-import-position
from ddpm import convert, samplers, schedules, train  # pylint: disable=wrong-import-position
from ddpm.configs import cifar10, demo  # pylint: disable=wrong-import-position


def timed(fn, repeats):
  fn()  # Warm-up / compilation.
  times = []
  for _ in range(repeats):
    time.sleep(0.05)  # Lets PyTorch's spinning OpenMP threads go idle (see `interleaved`).
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def torch_on(device: str = 'cpu', dtype: str = 'float32'):
  """(autocast(), sync()) for the PyTorch peers: bfloat16 autocast (mixed precision, float32
  weights, as ours with model.dtype='bfloat16') and a CUDA sync so wall times are honest."""
  def autocast():
    return torch.autocast(device.split(':')[0], dtype=torch.bfloat16, enabled=dtype == 'bfloat16')

  def sync():
    if device.startswith('cuda'):
      torch.cuda.synchronize()

  return autocast, sync


def interleaved(fns: dict, repeats: int, gap: float = 2.0) -> dict:
  """{name: median seconds}: every fn warmed up, then called once per round, in turn.

  This machine's speed drifts by tens of percent from minute to minute (other tenants); taking
  ours, theirs and the kernel in the same rounds keeps their ratios honest. Each call waits
  `gap` seconds first, because work lingers after a call returns and slows the next one:
  PyTorch's OpenMP threads spin (a 3x3 conv started at once ran at 220 instead of 325
  GFLOP/s) and freed memory is reclaimed (our train step started 50 ms after diffusers' took
  2.7 s, 2 s after it 1.25 s).
  """
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      time.sleep(gap)
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def layer_calls(fn, *args) -> list:
  """Every nn.Conv and nn.Dense call that tracing fn(*args) makes, in order: ('dense', x shape
  [N, C_in], kernel shape, dtype) with the input flattened to 2-D, or ('conv', x shape, kernel
  shape, dtype, strides, explicit padding). Trace before fn is first called (a cached trace
  records nothing)."""
  calls = []

  def record(next_fun, args_, kwargs, context):
    m, x = context.module, args_[0] if args_ else None
    if context.method_name == '__call__' and isinstance(m, nn.Dense):
      calls.append(('dense', (math.prod(x.shape[:-1]), x.shape[-1]), (x.shape[-1], m.features),
                    m.dtype or x.dtype))
    elif context.method_name == '__call__' and isinstance(m, nn.Conv):
      assert x.ndim == 4 and m.feature_group_count == 1, (x.shape, m)
      kernel = (*m.kernel_size, x.shape[-1], m.features)
      strides = m.strides or 1
      strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
      pad = m.padding
      if isinstance(pad, str):
        pad = jax.lax.padtype_to_pads(x.shape[1:3], kernel[:2], strides, pad)
      elif isinstance(pad, int):
        pad = ((pad, pad),) * 2
      pad = tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)
      calls.append(('conv', x.shape, kernel, m.dtype or x.dtype, strides, pad))
    return next_fun(*args_, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(fn, *args)
  if not calls:
    raise ValueError('no nn.Conv / nn.Dense call was traced: was fn already called (cached)?')
  return calls


def kernel_fns(calls, backward: bool = False):
  """(XLA fn, PyTorch fn, FLOPs): a model's conv and dense layers alone, each of `calls`
  (`layer_calls`) run in turn at its shape, without bias, in each framework (convs NHWC /
  channels-last, dense as a matmul: nn.Linear's layout in PyTorch); with `backward`, each
  call's output and both its gradients (input and kernel), as in a train step.

  The floor of what the model can reach against PyTorch on this machine: a benchmark whose
  ratio is below this one loses time outside these kernels. One conv shape does not stand for
  a model: XLA's speed against PyTorch differs from shape to shape and between the forward,
  the input gradient and the kernel gradient (RESULTS.md, "ddpm"). The outputs are returned
  with the gradients because from the gradients alone XLA drops the forward op (a linear
  map's gradients do not need its output), which made an earlier one-shape "forward +
  backward" kernel time XLA's backward against PyTorch's forward and backward.
  """
  torch_dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
  arrays, ours, theirs, flops = {}, [], [], 0

  def array(shape, dtype, to_torch, grad=backward):  # One per shape and layout, shared by calls.
    key = (shape, jnp.dtype(dtype).name, to_torch)
    if key not in arrays:
      x = np.random.RandomState(len(arrays)).randn(*shape).astype(np.float32)
      arrays[key] = (jnp.asarray(x, dtype),
                     to_torch(torch.from_numpy(x)).to(torch_dtype[key[1]]).requires_grad_(grad))
    return arrays[key]

  nchw = lambda t: t.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
  oihw = lambda t: t.permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
  rows = lambda t: t.contiguous()
  out_in = lambda t: t.t().contiguous()  # nn.Linear's weight layout.
  for kind, x_shape, k_shape, dtype, *conv_args in calls:
    if kind == 'dense':
      op, torch_op, x_layout, k_layout = jnp.dot, torch.nn.functional.linear, rows, out_in
    else:
      strides, pad = conv_args
      if any(lo != hi for lo, hi in pad):  # Padded beforehand: PyTorch pads symmetrically only.
        x_shape = (x_shape[0], x_shape[1] + sum(pad[0]), x_shape[2] + sum(pad[1]), x_shape[3])
        pad = ((0, 0), (0, 0))
      op = functools.partial(jax.lax.conv_general_dilated, window_strides=strides, padding=pad,
                             dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      torch_op = functools.partial(torch.nn.functional.conv2d, stride=strides,
                                   padding=(pad[0][0], pad[1][0]))
      x_layout, k_layout = nchw, oihw
    x, xt = array(x_shape, dtype, x_layout)
    k, kt = array(k_shape, dtype, k_layout)
    y_shape = jax.eval_shape(op, x, k).shape
    flops += 2 * math.prod(y_shape) * math.prod(k_shape[:-1]) * (3 if backward else 1)
    if not backward:
      ours.append(functools.partial(jax.jit(op), x, k))
      theirs.append(functools.partial(torch_op, xt, kt))
      continue
    dy, dyt = array(y_shape, dtype, x_layout, grad=False)

    def fwd_bwd(x, k, dy, op=op):  # The output too (see above).
      y, vjp = jax.vjp(op, x, k)
      return y, vjp(dy)

    def torch_fwd_bwd(xt, kt, dyt, torch_op=torch_op):
      xt.grad = kt.grad = None
      torch_op(xt, kt).backward(dyt)

    ours.append(functools.partial(jax.jit(fwd_bwd), x, k, dy))
    theirs.append(functools.partial(torch_fwd_bwd, xt, kt, dyt))

  def run_ours():
    for f in ours:
      jax.block_until_ready(f())

  def run_theirs():
    with torch.set_grad_enabled(backward):
      for f in theirs:
        f()

  return run_ours, run_theirs, flops


def with_kernel(fns: dict, repeats: int, calls: list, backward: bool = False) -> dict:
  """`interleaved` of `fns` and the model's kernels (`kernel_fns` of its `calls`: forward, or
  forward + backward for a train step) in the same rounds: {name: median s, 'kernel':
  PyTorch / XLA kernel time, 'gflops': (XLA, PyTorch)}."""
  kernel_ours, kernel_theirs, flops = kernel_fns(calls, backward)
  t = interleaved({**fns, 'kernel_ours': kernel_ours, 'kernel_theirs': kernel_theirs}, repeats)
  t['kernel'] = t['kernel_theirs'] / t['kernel_ours']
  t['gflops'] = (flops / t['kernel_ours'] / 1e9, flops / t['kernel_theirs'] / 1e9)
  return t


def xla_flops(jitted, *args) -> float:
  """FLOPs of one call, from XLA's cost analysis of the compiled program (0 if unavailable)."""
  return lowered_flops(jitted.lower(*args))


def lowered_flops(lowered) -> float:
  """FLOPs of a lowered program, from XLA's cost analysis (0 if unavailable)."""
  try:
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', 0.0))
  except Exception:  # pylint: disable=broad-except  (an estimate only; some backends lack it)
    return 0.0


def train_step_fn(batch, devices, dtype='float32'):
  """(fn running our trainer's own jitted step (EMA, clipping included) on a mesh of `devices`,
  parameter count, model, lower(): the step lowered for the current state, the step's
  `layer_calls`)."""
  config = cifar10.get_config()
  config.model.dtype = dtype
  config.model.dropout = 0.0  # Same work on both sides.
  config.augment.enabled = False
  config.train.batch_size = batch
  mesh = mesh_lib.make_mesh(devices=devices)
  model, schedule = train.build_model(config), train.build_schedule(config)
  tx = train.make_optimizer(config)
  state = train.create_train_state(config, model, tx, mesh)
  step_fn = train.make_train_step(config, model, schedule, tx, mesh)
  images = np.random.RandomState(0).randint(0, 256, (batch, 32, 32, 3), np.uint8)
  calls = layer_calls(step_fn, state, mesh_lib.shard_batch(images, mesh))
  box = [state]

  def ours():
    box[0], _ = step_fn(box[0], mesh_lib.shard_batch(images, mesh))
    jax.block_until_ready(box[0])  # The whole update, not just the loss.

  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  return (ours, n_params, model,
          lambda: step_fn.lower(box[0], mesh_lib.shard_batch(images, mesh)), calls)


def bench_train_step(batch, repeats, devices, dtype='float32', with_flops=False):
  ours, n_params, model, lower, _ = train_step_fn(batch, devices, dtype)
  seconds = timed(ours, repeats)
  if with_flops:
    return seconds, n_params, model, lowered_flops(lower())
  return seconds, n_params, model


def torch_train_step_fn(model, batch, device='cpu', dtype='float32'):
  autocast, sync = torch_on(device, dtype)
  torch_model = UNet2DModel(**convert.diffusers_config(model)).train().to(device)
  torch_model = torch_model.to(memory_format=torch.channels_last)
  opt = torch.optim.Adam(torch_model.parameters(), lr=2e-4)
  ref_sched = DDIMScheduler(num_train_timesteps=1000)
  ref_sched.alphas_cumprod = ref_sched.alphas_cumprod.to(device)
  x0 = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)

  def theirs():
    t = torch.randint(0, 1000, (batch,), device=device)
    noise = torch.randn_like(x0)
    with autocast():
      out = torch_model(ref_sched.add_noise(x0, noise, t), t).sample
    loss = torch.nn.functional.mse_loss(out.float(), noise)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
    opt.step()
    sync()

  return theirs


def bench_torch_train_step(model, batch, repeats, device='cpu', dtype='float32'):
  return timed(torch_train_step_fn(model, batch, device, dtype), repeats)


def ddim_fn(batch, devices, dtype='float32'):
  config = cifar10.get_config()
  config.model.dtype = dtype
  model = train.build_model(config)
  schedule = schedules.make_schedule('linear', 1000)
  mesh = mesh_lib.make_mesh(devices=devices)
  params = mesh_lib.replicate(
      model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))['params'], mesh)
  config.sample.num_steps = 50
  sample_fn = train.make_sample_fn(config, model, schedule)
  x_T = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3)),
                       mesh_lib.data_sharding(mesh))
  calls = layer_calls(sample_fn, params, jax.random.PRNGKey(2), x_T)  # One network call's.
  return lambda: sample_fn(params, jax.random.PRNGKey(2), x_T).block_until_ready(), model, calls


def bench_ddim(batch, repeats, devices, dtype='float32'):
  ours, model, _ = ddim_fn(batch, devices, dtype)
  return timed(ours, repeats), model


def torch_ddim_fn(model, batch, device='cpu', dtype='float32'):
  autocast, sync = torch_on(device, dtype)
  unet = UNet2DModel(**convert.diffusers_config(model)).eval()
  pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).to(device)
  pipe.set_progress_bar_config(disable=True)

  def theirs():
    with autocast():
      pipe(batch_size=batch, num_inference_steps=50, output_type='np')
    sync()

  return theirs


def bench_torch_ddim(model, batch, repeats, device='cpu', dtype='float32'):
  return timed(torch_ddim_fn(model, batch, device, dtype), repeats)


def bench_ddim_vs_ddpm(batch):
  config = demo.get_config()
  model = train.build_model(config)
  schedule = train.build_schedule(config)
  size = config.data.image_size
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,)))['params']
  x_T = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3))
  out = {}
  for name, kw in (('ddim50', dict(sampler='ddim', num_steps=50)),
                   ('ddpm1000', dict(sampler='ddpm'))):
    fn = jax.jit(lambda p, x, kw=kw: samplers.sample(
        schedule, lambda xx, t: model.apply({'params': p}, xx, t), x, jax.random.PRNGKey(0), **kw))
    out[name] = timed(lambda: fn(params, x_T).block_until_ready(), 1)
  return out


def one_and_all_devices(ours_1, make_ours_n, theirs, repeats, calls, backward):
  """Ours on one device and (when there are more) on all of them, theirs and the kernels, timed
  in the same rounds by with_kernel; 'ours_n' is 'ours_1' on a one-device machine."""
  fns = {'ours_1': ours_1, 'theirs': theirs}
  if jax.device_count() > 1:
    fns['ours_n'] = make_ours_n()
  times = with_kernel(fns, repeats, calls, backward=backward)
  times.setdefault('ours_n', times['ours_1'])
  return times


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--cpu-devices', type=int, default=os.cpu_count(),
                      help='CPU devices for the data-parallel runs (jax_num_cpu_devices).')
  parser.add_argument('--rows', default='abc', help='Which rows to measure (--write: all).')
  parser.add_argument('--write', action='store_true')
  args = parser.parse_args()
  if args.write and sorted(args.rows) != list('abc'):
    parser.error('--write replaces the whole section: measure every row (--rows abc).')
  jax.config.update('jax_num_cpu_devices', args.cpu_devices)  # Before the backend starts.
  torch.set_num_threads(os.cpu_count())
  device = jax.devices()[0]
  machine = (f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, '
             f'JAX device {device.platform}:{device.device_kind}, torch {torch.__version__} '
             f'({torch.get_num_threads()} threads), jax {jax.__version__}')
  print(machine)

  one, all_devices = jax.devices()[:1], jax.devices()
  n_dev = len(all_devices)

  if 'a' in args.rows:
    ours_1, n_params, model, _, calls = train_step_fn(args.batch, one)
    train = one_and_all_devices(ours_1, lambda: train_step_fn(args.batch, all_devices)[0],
                                torch_train_step_fn(model, args.batch), args.repeats, calls,
                                backward=True)
    train_1, train_n, theirs_train = train['ours_1'], train['ours_n'], train['theirs']
    print(f'(a) train step, {n_params / 1e6:.1f}M params, batch {args.batch}: ours {train_1:.3f} s '
          f'(1 device), {train_n:.3f} s ({n_dev} devices), diffusers {theirs_train:.3f} s; ratios '
          f'{theirs_train / train_1:.2f}x, {theirs_train / train_n:.2f}x; '
          f'kernel {train["kernel"]:.2f}x ({train["gflops"][0]:.0f} / {train["gflops"][1]:.0f} '
          'GFLOP/s)')
  if 'b' in args.rows:
    ddim_ours_1, model, calls = ddim_fn(args.batch, one)
    ddim = one_and_all_devices(ddim_ours_1, lambda: ddim_fn(args.batch, all_devices)[0],
                               torch_ddim_fn(model, args.batch), max(2, args.repeats // 2), calls,
                               backward=False)
    ddim_1, ddim_n, theirs_ddim = ddim['ours_1'], ddim['ours_n'], ddim['theirs']
    print(f'(b) DDIM-50, batch {args.batch}: ours {args.batch / ddim_1:.2f} img/s (1 device), '
          f'{args.batch / ddim_n:.2f} img/s ({n_dev} devices), diffusers '
          f'{args.batch / theirs_ddim:.2f} img/s; ratios {theirs_ddim / ddim_1:.2f}x, '
          f'{theirs_ddim / ddim_n:.2f}x; kernel {ddim["kernel"]:.2f}x '
          f'({ddim["gflops"][0]:.0f} / {ddim["gflops"][1]:.0f} GFLOP/s)')
  if 'c' in args.rows:
    steps = bench_ddim_vs_ddpm(64)
    print(f'(c) demo U-Net, batch 64: DDIM-50 {steps["ddim50"]:.2f} s, DDPM-1000 '
          f'{steps["ddpm1000"]:.2f} s, ratio {steps["ddpm1000"] / steps["ddim50"]:.1f}x')

  if args.write:
    section = (
        '## ddpm\n\n'
        f'Machine: {machine}. Command: `python benchmarks/bench_ddpm.py --batch {args.batch} '
        f'--repeats {args.repeats} --cpu-devices {args.cpu_devices} --write`. Ratio = diffusers '
        'time / our time (> 1: ours is faster). "N devices" is our data-parallel mesh over N CPU '
        'devices, what `--config.cpu_devices=N` gives a training run; torch uses all cores through '
        'its threads.\n\n'
        '"Kernel" is the ratio of the model\'s own conv and dense layers alone (every call the '
        'step makes, at its shape, without bias; for (a) each output and both gradients) '
        'measured in the same rounds (XLA / PyTorch GFLOP/s in brackets): below it, time goes '
        'outside the kernels. Times are medians of rounds that call each side and the kernel '
        'in turn, 2 s apart.\n\n'
        '| what | ours, 1 device | ours, all devices | diffusers (PyTorch) | ratio 1 / all | kernel |\n'
        '|---|---|---|---|---|---|\n'
        f'| (a) train step, cifar10 U-Net {n_params / 1e6:.1f}M, batch {args.batch}, f32 | '
        f'{train_1:.3f} s | {train_n:.3f} s ({n_dev}) | {theirs_train:.3f} s | '
        f'{theirs_train / train_1:.2f}x / {theirs_train / train_n:.2f}x | {train["kernel"]:.2f}x '
        f'({train["gflops"][0]:.0f} / {train["gflops"][1]:.0f}) |\n'
        f'| (b) DDIM-50 sampling, batch {args.batch} | {args.batch / ddim_1:.2f} img/s | '
        f'{args.batch / ddim_n:.2f} img/s | {args.batch / theirs_ddim:.2f} img/s | '
        f'{theirs_ddim / ddim_1:.2f}x / {theirs_ddim / ddim_n:.2f}x | {ddim["kernel"]:.2f}x '
        f'({ddim["gflops"][0]:.0f} / {ddim["gflops"][1]:.0f}) |\n'
        f'| (c) ours: DDPM-1000 vs DDIM-50 wall time (demo U-Net, batch 64, 1 device) | '
        f'DDIM-50 {steps["ddim50"]:.2f} s | DDPM-1000 {steps["ddpm1000"]:.2f} s | | '
        f'{steps["ddpm1000"] / steps["ddim50"]:.1f}x faster | |\n')
    write_section(Path(__file__).with_name('RESULTS.md'), 'ddpm', section)


def write_section(path: Path, name: str, section: str) -> None:
  """Replaces (or appends) the `## name` section of RESULTS.md, leaving the others."""
  text = path.read_text() if path.exists() else '# Benchmark results\n'
  pattern = re.compile(rf'^## {re.escape(name)}\n.*?(?=^## |\Z)', re.S | re.M)
  text = pattern.sub(section + '\n', text) if pattern.search(text) else text.rstrip() + '\n\n' + section
  path.write_text(text)
  print(f'Wrote the {name} section of {path}.')


if __name__ == '__main__':
  main()
