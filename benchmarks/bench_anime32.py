"""HW6 question 2 on a trained model: AFD and wall time of each sampler on the same noises.

  python benchmarks/bench_anime32.py samplers --config=ddpm/configs/anime32.py \
      --workdir=runs/anime32 --out=runs/anime32_samplers --ddpm-num=100 \
      --figure=benchmarks/figures/anime32_samplers.png

draws --num initial noises x_T once, runs DDPM-1000, DDIM-50/20/10 and DPM-Solver++(2M) 20/10
from them (the EMA weights), writes each sampler's images to OUT/<sampler>-<steps>/, and prints
a table: AFD (`metrics.afd`, the `python -m metrics afd` defaults) and seconds per image
(compilation excluded; this process's devices, batch --batch). DDPM-1000 costs 1000 network
calls per image, so it can run on the first --ddpm-num of the noises; every row also gives the
AFD on that subset, so the comparison with DDPM stays on the same noises.

  python benchmarks/bench_anime32.py compare --real=runs/faces_heldout \
      ours=runs/anime32_samplers/ddim-50 lucidrains=runs/lucid32_samples

AFD of each folder and KID between it and the held-out real faces, on the FID Inception
architecture with random (Kaiming) weights: the released weights are not downloadable here,
so the KID is a relative check between the folders, not a number to compare with papers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import config as config_lib, imageio  # noqa: E402
from ddpm import train  # noqa: E402
from metrics import afd as afd_lib  # noqa: E402

# HW6's question 2: DDPM against DDIM at a fraction of the steps, and a second-order solver.
RUNS = (('ddpm', 1000), ('ddim', 50), ('ddim', 20), ('ddim', 10), ('dpm_solver', 20),
        ('dpm_solver', 10))
LABELS = {'ddpm': 'DDPM', 'ddim': 'DDIM', 'dpm_solver': 'DPM-Solver++(2M)'}


def sample_all(config, params, model, schedule, x_T, rng, batch: int):
  """Images (uint8) from the noises x_T, and the seconds they took without compilation."""
  fn, fn_batch = None, 0
  images, seconds = [], 0.0
  for start in range(0, len(x_T), batch):
    x = x_T[start:start + batch]
    if fn is None or len(x) != fn_batch:
      fn = train.make_sample_fn(config, model, schedule).lower(params, rng, x).compile()
      fn_batch = len(x)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(params, jax.random.fold_in(rng, start), x))
    seconds += time.perf_counter() - t0
    images.append(imageio.to_uint8(np.asarray(out)))
  return np.concatenate(images), seconds


def samplers(args, overrides):
  config = config_lib.from_file(args.config, overrides)
  exp = train.Experiment(config)
  model, schedule = exp.model, exp.schedule
  params = exp.sampling_params(args.workdir, use_ema=True)
  x_T = np.asarray(train.noise_like_batch(jax.random.PRNGKey(args.seed), args.num, config))
  rng = jax.random.PRNGKey(args.seed + 1)
  rows = []
  for sampler, steps in RUNS:
    config.sample.sampler, config.sample.num_steps = sampler, steps
    n = args.ddpm_num if sampler == 'ddpm' else args.num
    images, seconds = sample_all(config, params, model, schedule, x_T[:n], rng, args.batch)
    out = Path(args.out) / f'{sampler}-{steps}'
    imageio.write_numbered(images, out)
    score = afd_lib.afd(out, progress=False)  # The files, as `python -m metrics afd` scores them.
    subset = np.mean([r.num_faces > 0 for r in score.per_image
                      if int(Path(r.name).stem) <= args.ddpm_num])  # Files are 1.jpg ... N.jpg.
    rows.append(dict(sampler=sampler, steps=steps, n=n, afd=score.rate, afd_subset=subset,
                     s_per_image=seconds / n))
    print(f'{LABELS[sampler]}-{steps}: AFD {score.rate:.3f} on {n}, {subset:.3f} on the '
          f'first {args.ddpm_num}; {seconds / n:.3f} s/image', flush=True)

  ddpm = rows[0]
  print(f'\n{jax.device_count()} {jax.devices()[0].platform} device(s), batch {args.batch}, '
        f'{args.num} noises (DDPM-1000 on the first {args.ddpm_num}).\n')
  print(f'| sampler | steps | AFD ({args.num}) | AFD (first {args.ddpm_num}) | s/image '
        '| faster than DDPM-1000 |')
  print('|---|---:|---:|---:|---:|---:|')
  for r in rows:
    full = f'{r["afd"]:.3f}' if r['n'] == args.num else '-'
    print(f'| {LABELS[r["sampler"]]} | {r["steps"]} | {full} | {r["afd_subset"]:.3f} | '
          f'{r["s_per_image"]:.3f} | {ddpm["s_per_image"] / r["s_per_image"]:.1f}x |')
  (Path(args.out) / 'rows.json').write_text(json.dumps(rows, indent=1))
  if args.figure:
    plot(rows, args.figure, args.ddpm_num)


def plot(rows, path, ddpm_num: int):
  """AFD against seconds per image: one colour per sampler, its step counts written beside."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5.5, 3.4))
  for i, (sampler, label) in enumerate(LABELS.items()):
    mine = [r for r in rows if r['sampler'] == sampler]
    ax.plot([r['s_per_image'] for r in mine], [r['afd_subset'] for r in mine], 'o-', label=label,
            color=f'C{i}')
    for r in mine:
      ax.annotate(str(r['steps']), (r['s_per_image'], r['afd_subset']), fontsize=8,
                  textcoords='offset points', xytext=(4, 6 if sampler == 'ddim' else -11))
  ax.set_xscale('log')
  ax.set_xlabel('sampling seconds per image (2-core CPU, log scale)')
  ax.set_ylabel(f'AFD (the same {ddpm_num} noises)')
  ax.set_ylim(0.5, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f'Wrote {path}.')


def compare(args, folders):
  sys.path.insert(0, str(ROOT / 'tests'))
  import _torch_compat as tc  # pylint: disable=g-import-not-at-top  (stubs torchvision first)
  from metrics import features, inception, kid  # pylint: disable=g-import-not-at-top
  ext = features.FeatureExtractor(
      params=inception.params_from_state_dict(tc.state_dict_numpy(
          tc.random_pytorch_fid_inception(seed=0))), batch_size=50)
  real = kid.features_of(args.real, extractor=ext, progress=False)
  print(f'| samples | AFD | KID vs {len(real)} held-out faces (random-weight Inception, '
        '100 subsets of 250; relative only) |')
  print('|---|---:|---:|')
  for item in folders:
    name, folder = item.split('=', 1)
    score = afd_lib.afd(folder, progress=False)
    k = kid.kid_from_features(kid.features_of(folder, extractor=ext, progress=False), real,
                              subset_size=250)
    print(f'| {name} ({score.num_images}) | {score.rate:.3f} | {k.mean:.1f} '
          f'+- {k.std:.1f} |', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('samplers', help='AFD and s/image of each sampler on the same noises.')
  p.add_argument('--config', required=True)
  p.add_argument('--workdir', required=True)
  p.add_argument('--out', required=True, help="each sampler's images go to OUT/<sampler>-<steps>")
  p.add_argument('--num', type=int, default=500)
  p.add_argument('--ddpm-num', type=int, default=500)
  p.add_argument('--batch', type=int, default=250)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--figure', default='')
  p = sub.add_parser('compare', help='AFD, and KID against held-out faces, of sample folders.')
  p.add_argument('--real', required=True, help='held-out real faces')
  args, rest = parser.parse_known_args()
  if args.command == 'samplers':
    samplers(args, rest)  # rest: --config.KEY=VALUE overrides.
  else:
    compare(args, rest)   # rest: NAME=FOLDER items.


if __name__ == '__main__':
  main()
