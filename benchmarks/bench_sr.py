"""Super-resolution against bicubic on held-out faces (benchmarks/RESULTS.md, "Super-resolution").

  python benchmarks/bench_sr.py --workdir /work/runs/sr_anime --num 200

Takes the first --num of the config's held-out faces (the data's last sr.holdout files, never
trained on), makes each factor's low-resolution copy as training does (box average, 8 bits,
written as PNG to OUT/x<f>/low/), and upscales it twice: bicubic (exactly the model's
conditioning) and the SR model through `ddpm.sr.upscale`, the function behind
`--mode=upscale` (to OUT/x<f>/sr/, same file names; bicubic to OUT/x<f>/bicubic/). Against the
originals: PSNR and SSIM (scikit-image, per image, averaged), sharpness (mean gradient
magnitude of the grey image relative to the original's: 1 = as sharp, bicubic is blurrier),
and AFD of the outputs (metrics.afd, animeface; `python -m metrics afd OUT/x4/sr` gives the
same). Prints a markdown table; writes the side-by-side figure
(low-res | bicubic | SR | original, both factors) to --figure.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import config as config_lib, data, imageio  # pylint: disable=wrong-import-position
from ddpm import sr  # pylint: disable=wrong-import-position
from ddpm.configs import sr_anime  # pylint: disable=wrong-import-position
from metrics import afd as afd_lib  # pylint: disable=wrong-import-position


def sharpness(images: np.ndarray) -> np.ndarray:
  """Mean gradient magnitude of each image's grey level (finite differences), per image."""
  grey = images.astype(np.float32).mean(axis=-1)
  gy, gx = np.diff(grey, axis=1)[:, :, :-1], np.diff(grey, axis=2)[:, :-1, :]
  return np.sqrt(gx**2 + gy**2).mean(axis=(1, 2))


def measure(images: np.ndarray, originals: np.ndarray) -> dict:
  from skimage import metrics  # pylint: disable=g-import-not-at-top
  psnr = [metrics.peak_signal_noise_ratio(o, x, data_range=255) for o, x in zip(originals, images)]
  ssim = [metrics.structural_similarity(o, x, channel_axis=-1, data_range=255)
          for o, x in zip(originals, images)]
  afd = afd_lib.afd(images, progress=False)
  return dict(psnr=float(np.mean(psnr)), ssim=float(np.mean(ssim)),
              sharpness=float(np.mean(sharpness(images)) / np.mean(sharpness(originals))),
              afd=afd.rate)


def figure(rows: dict, path: Path, num: int) -> None:
  """Per factor, `num` faces as low-res (nearest) | bicubic | SR | original."""
  titles = ('low-res', 'bicubic', 'SR (ours)', 'original')
  cols = 4 * len(rows)
  fig, axes = plt.subplots(num, cols, figsize=(1.1 * cols, 1.1 * num + 0.3), squeeze=False)
  for k, (factor, panels) in enumerate(rows.items()):
    for j, (title, images) in enumerate(zip(titles, panels)):
      axes[0, 4 * k + j].set_title(f'{title}' + (f' (x{factor})' if j == 0 else ''), fontsize=7)
      for i in range(num):
        axes[i, 4 * k + j].imshow(images[i], interpolation='nearest')
  for ax in axes.ravel():
    ax.axis('off')
  fig.tight_layout(pad=0.2)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='A trained sr_anime run.')
  parser.add_argument('--num', type=int, default=200, help='Held-out faces to measure on.')
  parser.add_argument('--out', default='', help='Images go here (default WORKDIR/bench).')
  parser.add_argument('--figure', default='benchmarks/figures/sr_anime.png')
  parser.add_argument('--figure-rows', type=int, default=6)
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='sample.* override, e.g. sample.num_steps=50 (repeatable).')
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')

  config = sr_anime.get_config()
  config_lib.override(config, args.set)
  out = Path(args.out or Path(args.workdir) / 'bench')
  _, held_out = sr.split_holdout(data.load_dataset(config.data), config.sr.holdout)
  originals = held_out[:args.num]
  size = config.data.image_size
  print(f'{len(originals)} held-out faces, {config.sample.sampler} x{config.sample.num_steps}, '
        f'noise level {config.sample.noise_level}')

  table, panels = [], {}
  for f in sorted(config.sr.factors, reverse=True):
    low = sr.degrade_uint8(originals, f, config.sr.downsample)
    bicubic = sr.bicubic_uint8(low, size)
    names = [f'{i:04d}.png' for i in range(len(low))]
    for folder, images in (('low', low), ('bicubic', bicubic)):
      for name, im in zip(names, images):
        imageio.save_image(im, out / f'x{f}' / folder / name)
    config.sample.input = str(out / f'x{f}' / 'low')
    config.sample.output_dir = str(out / f'x{f}' / 'sr')
    start = time.perf_counter()
    sr.upscale(config, args.workdir)  # What --mode=upscale runs.
    seconds = time.perf_counter() - start
    ours = np.stack([imageio.read_image(out / f'x{f}' / 'sr' / n) for n in names])
    for method, images in (('bicubic', bicubic), ('SR (ours)', ours)):
      row = measure(images, originals)
      table.append((f'x{f} ({size // f}->{size})', method, row,
                    seconds / len(low) if method != 'bicubic' else None))
    panels[f] = (low, bicubic, ours, originals)
  real_afd = afd_lib.afd(originals, progress=False).rate

  print('\n| factor | method | PSNR (dB) | SSIM | sharpness (originals = 1) | AFD | s/image |')
  print('|---|---|---|---|---|---|---|')
  for factor, method, r, t in table:
    print(f'| {factor} | {method} | {r["psnr"]:.2f} | {r["ssim"]:.3f} | {r["sharpness"]:.2f} | '
          f'{r["afd"]:.3f} | {"" if t is None else f"{t:.2f}"} |')
  print(f'| - | originals | - | 1 | 1 | {real_afd:.3f} | |')
  figure(panels, Path(args.figure), args.figure_rows)
  print(f'\nfigure: {args.figure}; images: {out}/x*/{{low,bicubic,sr}}/')


if __name__ == '__main__':
  main()
