"""ddpm speed against diffusers (PyTorch), measured side by side in one run.

  python benchmarks/bench_ddpm.py [--batch 16] [--repeats 5] [--write]

(a) train step (forward, backward, Adam) of the `cifar10` U-Net (35.7M
    parameters) against diffusers' UNet2DModel built with the same
    architecture, float32, batch 16 at 32x32;
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
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.torch_compat import patch_torchvision  # pylint: disable=wrong-import-position

patch_torchvision()
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel  # pylint: disable=wrong-import-position

from ddpm import convert, diffusion, samplers, schedules, train  # pylint: disable=wrong-import-position
from ddpm.configs import cifar10, demo  # pylint: disable=wrong-import-position


def timed(fn, repeats):
  fn()  # Warm-up / compilation.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def bench_train_step(batch, repeats):
  config = cifar10.get_config()
  config.model.dropout = 0.0  # Same work on both sides.
  model = train.build_model(config)
  schedule = schedules.make_schedule('linear', 1000)
  tx = optax.adam(2e-4)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))['params']
  opt_state = tx.init(params)
  x0 = jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3))

  @jax.jit
  def step(params, opt_state, rng):
    def loss_fn(p):
      return diffusion.diffusion_loss(schedule, lambda x, t: model.apply({'params': p}, x, t),
                                      x0, rng)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, opt_state]

  def ours():
    state[0], state[1], loss = step(state[0], state[1], jax.random.PRNGKey(2))
    loss.block_until_ready()

  torch_model = UNet2DModel(**convert.diffusers_config(model)).train()
  opt = torch.optim.Adam(torch_model.parameters(), lr=2e-4)
  ref_sched = DDIMScheduler(num_train_timesteps=1000)
  xt0 = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
  torch_model = torch_model.to(memory_format=torch.channels_last)

  def theirs():
    t = torch.randint(0, 1000, (batch,))
    noise = torch.randn_like(xt0)
    xt = ref_sched.add_noise(xt0, noise, t)
    loss = torch.nn.functional.mse_loss(torch_model(xt, t).sample, noise)
    opt.zero_grad()
    loss.backward()
    opt.step()

  n_params = sum(x.size for x in jax.tree.leaves(params))
  return timed(ours, repeats), timed(theirs, repeats), n_params


def bench_ddim(batch, repeats):
  config = cifar10.get_config()
  model = train.build_model(config)
  schedule = schedules.make_schedule('linear', 1000)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))['params']
  config.sample.num_steps = 50
  sample_fn = train.make_sample_fn(config, model, schedule)
  x_T = jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3))
  ours = lambda: sample_fn(params, jax.random.PRNGKey(2), x_T).block_until_ready()
  unet = UNet2DModel(**convert.diffusers_config(model)).eval()
  pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
  pipe.set_progress_bar_config(disable=True)
  theirs = lambda: pipe(batch_size=batch, num_inference_steps=50, output_type='np')
  return timed(ours, repeats), timed(theirs, max(1, repeats // 2))


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
  parser.add_argument('--write', action='store_true')
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  device = jax.devices()[0]
  machine = (f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, '
             f'JAX device {device.platform}:{device.device_kind}, torch {torch.__version__} '
             f'({torch.get_num_threads()} threads), jax {jax.__version__}')
  print(machine)

  ours_train, theirs_train, n_params = bench_train_step(args.batch, args.repeats)
  print(f'(a) train step, {n_params / 1e6:.1f}M params, batch {args.batch}: ours {ours_train:.3f} s, '
        f'diffusers {theirs_train:.3f} s, ratio {theirs_train / ours_train:.2f}x')
  ours_ddim, theirs_ddim = bench_ddim(args.batch, args.repeats)
  print(f'(b) DDIM-50, batch {args.batch}: ours {args.batch / ours_ddim:.2f} img/s, diffusers '
        f'{args.batch / theirs_ddim:.2f} img/s, ratio {theirs_ddim / ours_ddim:.2f}x')
  steps = bench_ddim_vs_ddpm(64)
  print(f'(c) demo U-Net, batch 64: DDIM-50 {steps["ddim50"]:.2f} s, DDPM-1000 '
        f'{steps["ddpm1000"]:.2f} s, ratio {steps["ddpm1000"] / steps["ddim50"]:.1f}x')

  if args.write:
    section = (
        '## ddpm\n\n'
        f'Machine: {machine}. Command: `python benchmarks/bench_ddpm.py --batch {args.batch} '
        f'--repeats {args.repeats} --write`. Ratio > 1 means ours is faster.\n\n'
        '| what | ours | diffusers (PyTorch) | ratio |\n|---|---|---|---|\n'
        f'| (a) train step, cifar10 U-Net {n_params / 1e6:.1f}M, batch {args.batch}, f32 | '
        f'{ours_train:.3f} s | {theirs_train:.3f} s | {theirs_train / ours_train:.2f}x |\n'
        f'| (b) DDIM-50 sampling, batch {args.batch} | {args.batch / ours_ddim:.2f} img/s | '
        f'{args.batch / theirs_ddim:.2f} img/s | {theirs_ddim / ours_ddim:.2f}x |\n'
        f'| (c) ours: DDPM-1000 vs DDIM-50 wall time (demo U-Net, batch 64) | '
        f'DDIM-50 {steps["ddim50"]:.2f} s | DDPM-1000 {steps["ddpm1000"]:.2f} s | '
        f'{steps["ddpm1000"] / steps["ddim50"]:.1f}x |\n')
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
