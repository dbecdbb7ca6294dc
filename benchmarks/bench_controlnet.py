"""How closely ControlNet samples follow their control maps: edge F1 against three baselines.

For held-out pictures (never seen by the ControlNet), each picture's Canny map
M_i steers a sample G_i (prompt: the picture's caption, or --prompt). Scored with
latent.controlnet.maps.edge_f1 (F1 of edge pixels, matched within --tolerance pixels) between
the Canny edges of the sample and:

  controlnet         M_i                   (does the sample follow its own map?)
  base, no control   M_i, the base's sample for the same prompt and noise
  shuffled pairing   M_j, j != i           (the controlled sample against another map:
                                            the agreement any two pictures share)

  python benchmarks/bench_controlnet.py --config=latent/configs/controlnet_demo.py \
      --workdir=runs/cn_demo --figure=benchmarks/figures/controlnet_digits.png --write

The config's base_workdir and data (the digits: the pictures after data.max_images) are the
run's; --write puts the table into benchmarks/RESULTS.md ("ControlNet").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ddpm import write_section  # noqa: E402
from common import config as config_lib, data, imageio, mesh as mesh_lib  # noqa: E402
from latent.controlnet import maps as maps_lib, model as controlnet  # noqa: E402
from latent.ldm import sample, sampler  # noqa: E402


def held_out(config, n: int):
  """(pictures, captions) after the run's data.max_images, which the ControlNet never saw."""
  c = config.data.copy_and_resolve_references()
  start = c.max_images
  if not start:
    raise SystemExit('The run trained on every picture (data.max_images=0): no held-out set.')
  c.max_images = start + n
  images, captions = data.load_captioned_dataset(c)
  return images[start:], captions[start:]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--workdir', required=True, help='the ControlNet run')
  parser.add_argument('--num', type=int, default=256, help='held-out pictures')
  parser.add_argument('--prompt', default=None, help="one prompt for all ('' = none); "
                      'default: each picture\'s caption')
  parser.add_argument('--tolerance', default='0,1', help='pixel tolerances, one column each')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--figure', default='', help='a PNG of map | ControlNet | base rows')
  parser.add_argument('--write', action='store_true', help='write benchmarks/RESULTS.md')
  args, overrides = parser.parse_known_args()
  config = config_lib.from_file(args.config, overrides)
  # Restoring resolves the config in place (the base's image size and architecture).
  exp, params = sample.restore_experiment(config, args.workdir, config.sample.use_ema)
  pictures, captions = held_out(config, args.num)
  if args.prompt is not None:
    captions = [args.prompt] * len(pictures)
  n = config.controlnet
  maps = maps_lib.control_maps(pictures, n.detector, n.low_threshold, n.high_threshold,
                               n.thickness)
  ids = jnp.asarray(exp.conds.prompt_ids(captions))
  sample_fn = sampler.for_config(config, exp.model, exp.schedule, exp.stage1,
                                 exp.sampler_options())
  u = exp.model.unet
  noise = jax.random.normal(jax.random.PRNGKey(args.seed),
                            (len(ids), u.sample_size, u.sample_size, u.in_channels))
  rng = jax.random.PRNGKey(args.seed + 1)
  b = config.sample.batch_size

  def draw(control):
    out = []
    for i in range(0, len(ids), b):
      part = None if control is None else controlnet.as_input(control[i:i + b])
      x = sample_fn(params, exp.stage1.params, rng, ids[i:i + b], noise[i:i + b],
                    config.sample.guidance_scale, None, None, part, config.sample.control_scale)
      out.append(imageio.to_uint8(mesh_lib.gather(x)))
    return np.concatenate(out)

  start = time.perf_counter()
  controlled = draw(maps)
  plain = draw(None)  # The U-Net alone: the base model, the same prompts and noise.
  seconds = time.perf_counter() - start
  edges = lambda images: maps_lib.canny(images, n.low_threshold, n.high_threshold)[..., 0] > 0
  want = maps[..., 0] > 0
  shuffled = np.roll(want, 1, axis=0)  # Each sample against the next picture's map.
  tolerances = [int(t) for t in args.tolerance.split(',')]
  pairs = {'ControlNet (its own map)': (controlled, want),
           'base, no control (the same map)': (plain, want),
           'ControlNet vs a shuffled map': (controlled, shuffled)}
  prompt = 'each picture\'s caption' if args.prompt is None else repr(args.prompt)
  lines = [f'{len(pictures)} held-out {pictures.shape[1]}x{pictures.shape[2]} pictures, '
           f'{n.detector} maps, prompt: {prompt}, {config.sample.sampler} '
           f'x{config.sample.num_steps}, guidance {config.sample.guidance_scale:g} (sampling '
           f'both sets: {seconds:.0f} s). Mean edge F1 (share of samples with F1 > 0.5), edges '
           'matched within the tolerance:', '',
           '| samples scored against | ' + ' | '.join(f'tolerance {t} px' for t in tolerances)
           + ' |', '|---|' + '---|' * len(tolerances)]
  for name, (images, reference) in pairs.items():
    scores = [maps_lib.edge_f1(edges(images), reference, t) for t in tolerances]
    lines.append(f'| {name} | ' + ' | '.join(f'{f.mean():.3f} ({np.mean(f > 0.5):.2f})'
                                              for f in scores) + ' |')
  table = '\n'.join(lines)
  print(table)
  if args.figure:
    k = min(8, len(pictures))
    rows = np.concatenate([maps[:k], controlled[:k], plain[:k]])
    zoom = max(1, 64 // rows.shape[1])  # Small pictures shown at 64 px (nearest).
    rows = rows.repeat(zoom, axis=1).repeat(zoom, axis=2)
    grid = imageio.make_grid(rows, ncol=k)
    imageio.save_image(grid, args.figure)
    print(f'Wrote {args.figure} (rows: control map, ControlNet sample, base sample).')
  if args.write:
    command = ' '.join(['python benchmarks/bench_controlnet.py', *sys.argv[1:]])
    write_section(Path(__file__).parent / 'RESULTS.md', 'ControlNet',
                  f'## ControlNet\n\n`{command}`\n\n{table}\n')


if __name__ == '__main__':
  main()
