"""The HW6 seed code's trainer (lucidrains' denoising-diffusion-pytorch) on the 32x32 faces.

Its U-Net at about our anime32 model's parameter count (dim=32, dim_mults=(1, 2, 4): 2.61M vs
2.74M), GaussianDiffusion and Trainer at their defaults otherwise (pred_v, sigmoid schedule,
batch 16, lr 1e-4, EMA 0.995 every 10 steps, a 25-image 1000-step sample grid and a checkpoint
every 1000 steps), except calculate_fid=False (it would download Inception weights). Training
stops after --minutes of wall time and saves model-final.pt; --sample then writes PNGs from the
EMA model. Not a test and not part of the package: `pip install denoising-diffusion-pytorch`
(with torch==2.13.0 pinned on CPU) to run it. benchmarks/RESULTS.md has the commands.
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.torch_compat import patch_torchvision  # noqa: E402

patch_torchvision()  # The registry's torchvision is a CUDA build: make it import on CPU torch.
import torch  # noqa: E402
from denoising_diffusion_pytorch import GaussianDiffusion, Trainer, Unet  # noqa: E402


def build(folder, results, sampling_steps=None):
  model = Unet(dim=32, dim_mults=(1, 2, 4))
  diffusion = GaussianDiffusion(model, image_size=32, sampling_timesteps=sampling_steps)
  return Trainer(diffusion, folder, results_folder=results, calculate_fid=False)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--folder', required=True, help='training images (any size; resized to 32)')
  p.add_argument('--results', required=True)
  p.add_argument('--minutes', type=float, default=60)
  p.add_argument('--sample', type=int, default=0, help='write this many samples instead')
  p.add_argument('--steps', type=int, default=50, help='sampling steps (1000 = its DDPM)')
  p.add_argument('--batch', type=int, default=250)
  p.add_argument('--out', default='')
  p.add_argument('--seed', type=int, default=1)
  args = p.parse_args()
  torch.set_num_threads(len(os.sched_getaffinity(0)))

  if args.sample:
    trainer = build(args.folder, args.results, None if args.steps >= 1000 else args.steps)
    trainer.load('final')
    model = trainer.ema.ema_model.eval()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    start, k = time.time(), 0
    from torchvision.utils import save_image
    with torch.inference_mode():
      while k < args.sample:
        n = min(args.batch, args.sample - k)
        for img in model.sample(batch_size=n):
          save_image(img, os.path.join(args.out, f'{k:06d}.png'))
          k += 1
    seconds = time.time() - start
    print(json.dumps({'images': k, 'steps': args.steps, 'seconds': seconds,
                      's_per_image': seconds / k}))
    return

  trainer = build(args.folder, args.results)
  start = time.time()

  def stop(*_):  # The loop checks step < train_num_steps before each step.
    trainer.train_num_steps = trainer.step

  signal.signal(signal.SIGALRM, stop)
  signal.alarm(int(args.minutes * 60))
  trainer.train()
  trainer.save('final')
  info = {'steps': trainer.step, 'minutes': (time.time() - start) / 60,
          'images': trainer.step * trainer.batch_size}
  print(json.dumps(info))
  with open(os.path.join(args.results, 'run.json'), 'w') as f:
    json.dump(info, f)


if __name__ == '__main__':
  main()
