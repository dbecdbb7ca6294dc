"""ddpm speed against diffusers (PyTorch), measured side by side in one run.

  python benchmarks/bench_ddpm.py [--batch 16] [--repeats 5] [--write]

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
import os
import platform
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

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


def conv_kernel_ratio(repeats: int = 5, shape=(16, 32, 32, 128)) -> tuple[float, float, float]:
  """(XLA GFLOP/s, PyTorch GFLOP/s, their ratio) of one f32 3x3 convolution, same shape.

  The floor of what a conv net can reach against PyTorch on this machine: a benchmark whose
  ratio is below this one loses time outside the convolution kernels.
  """
  b, h, w, c = shape
  flops = 2 * b * h * w * c * c * 9
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c, c))
  conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  ours = timed(lambda: conv(x, k).block_until_ready(), repeats)
  xt = torch.randn(b, c, h, w).contiguous(memory_format=torch.channels_last)
  kt = torch.randn(c, c, 3, 3).contiguous(memory_format=torch.channels_last)
  with torch.no_grad():
    theirs = timed(lambda: torch.nn.functional.conv2d(xt, kt, padding=1), repeats)
  return flops / ours / 1e9, flops / theirs / 1e9, theirs / ours


def xla_flops(jitted, *args) -> float:
  """FLOPs of one call, from XLA's cost analysis of the compiled program (0 if unavailable)."""
  try:
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', 0.0))
  except Exception:  # pylint: disable=broad-except  (an estimate only; some backends lack it)
    return 0.0


def bench_train_step(batch, repeats, devices, dtype='float32', with_flops=False):
  """Our trainer's own jitted step (EMA, clipping included) on a mesh of `devices`."""
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
  box = [state]

  def ours():
    box[0], metrics = step_fn(box[0], mesh_lib.shard_batch(images, mesh))
    metrics['loss'].block_until_ready()

  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  seconds = timed(ours, repeats)
  if with_flops:
    return seconds, n_params, model, xla_flops(step_fn, box[0], mesh_lib.shard_batch(images, mesh))
  return seconds, n_params, model


def bench_torch_train_step(model, batch, repeats, device='cpu', dtype='float32'):
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

  return timed(theirs, repeats)


def bench_ddim(batch, repeats, devices, dtype='float32'):
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
  ours = lambda: sample_fn(params, jax.random.PRNGKey(2), x_T).block_until_ready()
  return timed(ours, repeats), model


def bench_torch_ddim(model, batch, repeats, device='cpu', dtype='float32'):
  autocast, sync = torch_on(device, dtype)
  unet = UNet2DModel(**convert.diffusers_config(model)).eval()
  pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).to(device)
  pipe.set_progress_bar_config(disable=True)

  def theirs():
    with autocast():
      pipe(batch_size=batch, num_inference_steps=50, output_type='np')
    sync()

  return timed(theirs, repeats)


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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--cpu-devices', type=int, default=os.cpu_count(),
                      help='CPU devices for the data-parallel runs (jax_num_cpu_devices).')
  parser.add_argument('--write', action='store_true')
  args = parser.parse_args()
  jax.config.update('jax_num_cpu_devices', args.cpu_devices)  # Before the backend starts.
  torch.set_num_threads(os.cpu_count())
  device = jax.devices()[0]
  machine = (f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, '
             f'JAX device {device.platform}:{device.device_kind}, torch {torch.__version__} '
             f'({torch.get_num_threads()} threads), jax {jax.__version__}')
  print(machine)

  one, all_devices = jax.devices()[:1], jax.devices()
  n_dev = len(all_devices)
  train_1, n_params, model = bench_train_step(args.batch, args.repeats, one)
  train_n = bench_train_step(args.batch, args.repeats, all_devices)[0] if n_dev > 1 else train_1
  theirs_train = bench_torch_train_step(model, args.batch, args.repeats)
  print(f'(a) train step, {n_params / 1e6:.1f}M params, batch {args.batch}: ours {train_1:.3f} s '
        f'(1 device), {train_n:.3f} s ({n_dev} devices), diffusers {theirs_train:.3f} s; ratios '
        f'{theirs_train / train_1:.2f}x, {theirs_train / train_n:.2f}x')
  ddim_1, model = bench_ddim(args.batch, args.repeats, one)
  ddim_n = bench_ddim(args.batch, args.repeats, all_devices)[0] if n_dev > 1 else ddim_1
  theirs_ddim = bench_torch_ddim(model, args.batch, max(1, args.repeats // 2))
  print(f'(b) DDIM-50, batch {args.batch}: ours {args.batch / ddim_1:.2f} img/s (1 device), '
        f'{args.batch / ddim_n:.2f} img/s ({n_dev} devices), diffusers '
        f'{args.batch / theirs_ddim:.2f} img/s; ratios {theirs_ddim / ddim_1:.2f}x, '
        f'{theirs_ddim / ddim_n:.2f}x')
  steps = bench_ddim_vs_ddpm(64)
  xla_gf, torch_gf, kernel = conv_kernel_ratio(args.repeats)
  print(f'conv-kernel ratio (3x3 conv, f32): XLA {xla_gf:.0f} GFLOP/s, PyTorch {torch_gf:.0f}: '
        f'{kernel:.2f}x')
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
        f'"Kernel" is the ratio of one f32 3x3 convolution (16x32x32x128) measured in the same run '
        f'(XLA {xla_gf:.0f} GFLOP/s, PyTorch {torch_gf:.0f}): a conv net below it loses time '
        'outside the kernels.\n\n'
        '| what | ours, 1 device | ours, all devices | diffusers (PyTorch) | ratio 1 / all | kernel |\n'
        '|---|---|---|---|---|---|\n'
        f'| (a) train step, cifar10 U-Net {n_params / 1e6:.1f}M, batch {args.batch}, f32 | '
        f'{train_1:.3f} s | {train_n:.3f} s ({n_dev}) | {theirs_train:.3f} s | '
        f'{theirs_train / train_1:.2f}x / {theirs_train / train_n:.2f}x | {kernel:.2f}x |\n'
        f'| (b) DDIM-50 sampling, batch {args.batch} | {args.batch / ddim_1:.2f} img/s | '
        f'{args.batch / ddim_n:.2f} img/s | {args.batch / theirs_ddim:.2f} img/s | '
        f'{theirs_ddim / ddim_1:.2f}x / {theirs_ddim / ddim_n:.2f}x | {kernel:.2f}x |\n'
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
