"""Stable Diffusion pipelines against diffusers (PyTorch), side by side in one run.

  python benchmarks/bench_pipeline.py [--batch 2] [--repeats 2] [--write]

(a) text-to-image of a tiny random StableDiffusionPipeline folder (the one the tests
    build: 16x16 images, 8x8x4 latents), DDIM 25 steps at guidance 7.5 with a negative
    prompt: our `latent.sd.pipeline` on the folder against diffusers' own pipeline;
(b) one forward pass of an SD-1.5-shaped U-Net (random weights, 860M parameters; batch
    of 64x64x4 latents with a 77x768 context), ours against UNet2DConditionModel, float32,
    beside the U-Net's own conv and dense layers alone in each framework (the kernel ratio,
    bench_ddpm.with_kernel), all in the same rounds;
(c) its attention core at 64x64 (4096 tokens) against PyTorch's scaled_dot_product_attention.
Prints ratios (> 1: we are faster); --write replaces the `## pipelines` section of
benchmarks/RESULTS.md. PyTorch gets one thread per core this process may run on, so a run
pinned with `taskset -c 1` compares one core with one core.
"""

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
from bench_ddpm import interleaved, layer_calls, with_kernel, write_section  # pylint: disable=wrong-import-position  (patches torchvision)

import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffusers import UNet2DConditionModel  # pylint: disable=wrong-import-position

from latent.sd import config as sd_config, pipeline  # pylint: disable=wrong-import-position
from test_latent_pipeline import build_tiny_pipeline  # pylint: disable=wrong-import-position

# Stable Diffusion 1.5's unet/config.json (the architecture keys).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
    up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    use_linear_projection=False)


def bench_tiny_pipeline(batch, repeats):
  with tempfile.TemporaryDirectory() as tmp:
    folder, theirs = build_tiny_pipeline(Path(tmp))
    ours = pipeline.load(folder)
  prompts = ['red hair'] * batch
  latents = np.random.default_rng(0).standard_normal((batch, 8, 8, 4)).astype(np.float32)

  # Compiled once, as a user's session; the weights are its arguments.
  sample_fn, params, vae_params = pipeline.make_sample_fn(ours, 'ddim', 25)

  def run_ours():  # Prompts are tokenised and encoded per call, as diffusers' pipeline does.
    ids = pipeline.prompt_ids(ours, prompts)
    negative_ids = pipeline.prompt_ids(ours, ['blue'] * batch)
    images = sample_fn(params, vae_params, jax.random.PRNGKey(0), ids, jnp.asarray(latents),
                       jnp.float32(7.5), negative_ids=negative_ids)
    np.asarray(images)  # On the host, as diffusers' output_type='np'.

  torch_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2))

  def run_theirs():
    with torch.no_grad():
      theirs(prompts, negative_prompt=['blue'] * batch, num_inference_steps=25,
             guidance_scale=7.5, latents=torch_latents, output_type='np')

  theirs.set_progress_bar_config(disable=True)
  times = interleaved({'ours': run_ours, 'theirs': run_theirs}, repeats)
  return times['ours'], times['theirs']


def bench_sd15_unet(batch, repeats):
  unet = sd_config.unet_from_config(dict(SD15_UNET))
  z = jnp.asarray(np.random.default_rng(0).standard_normal((batch, 64, 64, 4)), jnp.float32)
  t = jnp.full((batch,), 500, jnp.int32)
  context = jnp.asarray(np.random.default_rng(1).standard_normal((batch, 77, 768)), jnp.float32)
  params = jax.jit(lambda: unet.init(jax.random.PRNGKey(0), z, t, context=context))()['params']
  n_params = sum(x.size for x in jax.tree.leaves(params))
  forward = jax.jit(lambda p, z, t, c: unet.apply({'params': p}, z, t, context=c))
  calls = layer_calls(forward, params, z, t, context)  # Before the first call (see there).
  run_ours = lambda: forward(params, z, t, context).block_until_ready()

  torch.manual_seed(0)
  theirs_unet = UNet2DConditionModel(**SD15_UNET).eval()
  zt = torch.from_numpy(np.asarray(z).transpose(0, 3, 1, 2).copy())
  tt = torch.full((batch,), 500)
  ct = torch.from_numpy(np.asarray(context))

  def run_theirs():
    with torch.no_grad():
      theirs_unet(zt, tt, encoder_hidden_states=ct)

  return with_kernel({'ours': run_ours, 'theirs': run_theirs}, repeats, calls), n_params


def bench_attention(batch, repeats):
  """The attention core at SD-1.5's 64x64 level (4096 tokens, 8 heads of 40): ours
  (ddpm.models.dot_product_attention, what every U-Net here calls) against PyTorch's fused
  scaled_dot_product_attention, which diffusers calls."""
  from ddpm import models  # pylint: disable=g-import-not-at-top
  q = np.random.default_rng(2).standard_normal((batch, 4096, 8, 40)).astype(np.float32)
  attend = jax.jit(models.dot_product_attention)
  qj = jnp.asarray(q)
  qt = torch.from_numpy(q.transpose(0, 2, 1, 3).copy())

  def run_theirs():
    with torch.no_grad():
      torch.nn.functional.scaled_dot_product_attention(qt, qt, qt)

  times = interleaved({'ours': lambda: attend(qj, qj, qj).block_until_ready(),
                       'theirs': run_theirs}, repeats)
  return times['ours'], times['theirs']


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--write', action='store_true')
  args = parser.parse_args()
  b, r = args.batch, args.repeats
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  ours_tiny, theirs_tiny = bench_tiny_pipeline(b, r)
  print(f'tiny pipeline: ours {ours_tiny:.3f} s, diffusers {theirs_tiny:.3f} s', flush=True)
  unet, n_params = bench_sd15_unet(b, r)
  ours_unet, theirs_unet = unet['ours'], unet['theirs']
  print(f'SD-1.5 U-Net forward: ours {ours_unet:.2f} s, diffusers {theirs_unet:.2f} s, kernel '
        f'{unet["kernel"]:.2f}x', flush=True)
  ours_attn, theirs_attn = bench_attention(b, r)
  device = jax.devices()[0]
  report = '\n'.join([
      '## pipelines',
      '',
      f'Machine: {platform.machine()}, {len(jax.devices())} JAX device(s) {device.platform}:'
      f'{device.device_kind}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} cores, torch '
      f'{torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}. Command: '
      f'`python benchmarks/bench_pipeline.py --batch {b} --repeats {r} --write`. Random weights, '
      'float32. Ratio = diffusers time / our time (> 1: ours is faster). "Kernel" (b): the '
      "U-Net's conv and dense layers alone, every call at its shape, in each framework, timed "
      'in the same rounds as (b) (XLA / PyTorch GFLOP/s in brackets); below it, time goes '
      'outside those kernels, mostly to attention.',
      '',
      '| what | ours | diffusers | ratio | kernel |',
      '|---|---|---|---|---|',
      f'| (a) tiny SD pipeline folder, text-to-image, batch {b}, DDIM 25 at guidance 7.5 | '
      f'{ours_tiny:.3f} s | {theirs_tiny:.3f} s | {theirs_tiny / ours_tiny:.2f}x | |',
      f'| (b) SD-1.5-shaped U-Net forward ({n_params / 1e6:.0f}M), batch {b} at 64x64x4 | '
      f'{ours_unet:.2f} s | {theirs_unet:.2f} s | {theirs_unet / ours_unet:.2f}x | '
      f'{unet["kernel"]:.2f}x ({unet["gflops"][0]:.0f} / {unet["gflops"][1]:.0f}) |',
      f'| (c) its attention core at 64x64 (4096 tokens, 8 heads), batch {b}: ours vs PyTorch\'s '
      f'fused scaled_dot_product_attention | {ours_attn:.3f} s | {theirs_attn:.3f} s | '
      f'{theirs_attn / ours_attn:.2f}x | |',
      '',
      'The U-Net runs (c) five times per forward at 64x64, and the same at 1024 tokens five '
      'times at 32x32. Without gradients our attention runs in blocks of 128 queries, one '
      '(batch, head) at a time, so that each block\'s logits stay in cache '
      '(`common.layers._attention_in_blocks`); PyTorch runs a fused flash-style kernel. '
      'Times are medians of rounds that call each side (and the kernels) in turn, 2 s apart.',
      '',
  ])
  print(report)
  if args.write:
    write_section(Path(__file__).with_name('RESULTS.md'), 'pipelines', report)


if __name__ == '__main__':
  main()
