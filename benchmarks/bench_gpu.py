"""Ours against the PyTorch peers on one accelerator, float32 and bfloat16, with MFU.

  bash benchmarks/gpu.sh                      # installs the CUDA wheels, then runs this
  python benchmarks/bench_gpu.py [--device cuda] [--dtypes float32,bfloat16] [--write]

The workloads of bench_ddpm.py, bench_latent.py and bench_metrics.py, each side on the same
device: (a) the cifar10 U-Net train step against diffusers' UNet2DModel, (b) its DDIM-50
sampling against DDIMPipeline, (c) the ldm_anime_text train step and (d) its guided DDIM-50
against UNet2DConditionModel + a torch text encoder, (e) vae_anime encode + decode against
AutoencoderKL, (f) FID-Inception features against pytorch-fid (float32 only: FID is defined
in float32). bfloat16 is mixed precision on both sides: ours model.dtype='bfloat16' (float32
parameters), PyTorch autocast. Ratio = PyTorch time / our time (> 1: ours is faster).
MFU = XLA's FLOP count of our compiled program / our time / the device's dense peak (bf16 or
TF32 tensor-core peak; --peak-tflops overrides); the samplers' programs are loops, whose
FLOPs XLA counts once, so they get no MFU. Runs on the CPU too (--device cpu, small batches)
to check the script itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))

import bench_ddpm  # noqa: E402  (patches torchvision, imports torch and diffusers)
import bench_latent  # noqa: E402
import _torch_compat as tc  # noqa: E402
import torch  # noqa: E402

from metrics import features, inception  # noqa: E402

# Dense tensor-core peaks in TFLOP/s (vendor data sheets, SXM parts): (bfloat16, TF32).
PEAKS = {'H200': (989.0, 494.7), 'H100': (989.0, 494.7), 'A100': (312.0, 156.0),
         'L4': (121.0, 60.0), 'A10': (125.0, 62.5)}


def peak_tflops(dtype: str, override: float) -> float:
  if override:
    return override
  kind = jax.devices()[0].device_kind
  for name, (bf16, tf32) in PEAKS.items():
    if name in kind:
      return bf16 if dtype == 'bfloat16' else tf32
  return 0.0


def inception_rows(batch, repeats, device):
  model = tc.random_pytorch_fid_inception(seed=0)
  ext = features.FeatureExtractor(
      params=inception.params_from_state_dict(tc.state_dict_numpy(model)), batch_size=batch)
  model = model.to(device).to(memory_format=torch.channels_last)
  images = np.random.default_rng(0).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)
  _, sync = bench_ddpm.torch_on(device)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(device)

  @torch.no_grad()
  def theirs():
    model(x.contiguous(memory_format=torch.channels_last))
    sync()

  ours = bench_ddpm.timed(lambda: ext(images), repeats)
  return ours, bench_ddpm.timed(theirs, repeats)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--device', default='cuda', help="torch's device (JAX uses its default one)")
  p.add_argument('--dtypes', default='float32,bfloat16')
  p.add_argument('--ddpm-batch', type=int, default=128)
  p.add_argument('--latent-batch', type=int, default=64)
  p.add_argument('--metrics-batch', type=int, default=200)
  p.add_argument('--repeats', type=int, default=10)
  p.add_argument('--peak-tflops', type=float, default=0.0)
  p.add_argument('--write', action='store_true', help='the `## GPU` section of RESULTS.md')
  args = p.parse_args()
  torch.manual_seed(0)
  dev = jax.devices()[:1]
  r, bd, bl = args.repeats, args.ddpm_batch, args.latent_batch
  rows = []  # (what, dtype, ours s, theirs s, flops)
  for dtype in args.dtypes.split(','):
    first = len(rows)
    ours, _, model, flops = bench_ddpm.bench_train_step(bd, r, dev, dtype, with_flops=True)
    theirs = bench_ddpm.bench_torch_train_step(model, bd, r, args.device, dtype)
    rows.append((f'(a) ddpm cifar10 U-Net train step, batch {bd}', dtype, ours, theirs, flops))
    ours, model = bench_ddpm.bench_ddim(bd, max(1, r // 5), dev, dtype)
    theirs = bench_ddpm.bench_torch_ddim(model, bd, max(1, r // 5), args.device, dtype)
    rows.append((f'(b) ddpm DDIM-50, batch {bd}', dtype, ours, theirs, 0.0))
    ours, _, config, model, params, flops = bench_latent.bench_ours_train(
        bl, r, dtype, with_flops=True)
    theirs, modules = bench_latent.bench_torch_train(config, model, bl, r, args.device, dtype)
    rows.append((f'(c) latent text LDM train step, batch {bl}', dtype, ours, theirs, flops))
    ours = bench_latent.bench_ours_sampling(config, model, params, bl, max(1, r // 5))
    theirs = bench_latent.bench_torch_sampling(config, modules, bl, max(1, r // 5), args.device,
                                               dtype)
    rows.append((f'(d) latent guided DDIM-50, batch {bl}', dtype, ours, theirs, 0.0))
    ours, theirs, _, flops = bench_latent.bench_vae(bl, r, args.device, dtype, with_flops=True)
    rows.append((f'(e) VAE encode + decode 64x64, batch {bl}', dtype, ours, theirs, flops))
    if dtype == 'float32':
      ours, theirs = inception_rows(args.metrics_batch, r, args.device)
      rows.append((f'(f) FID-Inception features, batch {args.metrics_batch}', dtype, ours, theirs,
                   0.0))
    print(*(f'{w} {d}: ours {o:.4f} s, torch {t:.4f} s' for w, d, o, t, _ in rows[first:]),
          sep='\n', flush=True)

  device = jax.devices()[0]
  lines = [
      '## GPU', '',
      f'JAX device {device.platform}:{device.device_kind}, torch device {args.device} '
      f'({torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}), '
      f'jax {jax.__version__}, torch {torch.__version__}. Command: `bash benchmarks/gpu.sh`. '
      'Ratio = PyTorch time / our time (> 1: ours is faster); MFU of our program against the '
      'dense peak of its dtype.', '',
      '| what | dtype | ours | PyTorch | ratio | our TFLOP/s | MFU |',
      '|---|---|---:|---:|---:|---:|---:|']
  for what, dtype, ours, theirs, flops in rows:
    peak = peak_tflops(dtype, args.peak_tflops)
    tflops = flops / ours / 1e12 if flops else 0.0
    mfu = f'{100 * tflops / peak:.1f}%' if tflops and peak else '-'
    rate = f'{tflops:.1f}' if tflops else '-'
    lines.append(f'| {what} | {dtype} | {ours:.4f} s | {theirs:.4f} s | {theirs / ours:.2f}x | '
                 f'{rate} | {mfu} |')
  report = '\n'.join(lines) + '\n'
  print(report)
  if args.write:
    bench_ddpm.write_section(Path(__file__).with_name('RESULTS.md'), 'GPU', report)


if __name__ == '__main__':
  main()
