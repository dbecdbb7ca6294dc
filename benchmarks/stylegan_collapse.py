"""StyleGAN2 collapse experiments: train demo variants, follow G's sample diversity.

  python benchmarks/stylegan_collapse.py --name base --steps 400
  python benchmarks/stylegan_collapse.py --name mbstd16 --steps 2000 \
      --set model.mbstd_group_size=16 --set loss.pl_weight=0 --set loss.style_mixing_prob=0

Starts from stylegan/configs/demo.py with the overrides given, trains in-process
and every 100 steps prints the per-pixel std across 64 samples (fixed latents,
const noise) of G and G_ema relative to the real digits' (1 = as varied as the
data, 0 = one image for every z), with D's mean outputs and ADA's p. The last
G_ema grid goes to OUT/NAME.png. The figures in benchmarks/RESULTS.md
("StyleGAN2 collapse") come from this script.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import data as data_lib, imageio, mesh as mesh_lib  # pylint: disable=wrong-import-position
from stylegan import generate as generate_lib, phases, state as state_lib  # pylint: disable=wrong-import-position
from stylegan.configs import demo  # pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--name', default='run')
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='Config override, e.g. optim.learning_rate=0.01 (repeatable).')
  parser.add_argument('--out', default='/tmp/stylegan_collapse')
  args = parser.parse_args()

  c = demo.get_config()
  c.train.num_steps = args.steps
  for item in args.set:
    key, value = item.split('=', 1)
    section, name = key.split('.')
    c[section][name] = type(c[section][name])(ast.literal_eval(value))
  mesh = mesh_lib.make_mesh()
  images = data_lib.load_dataset(c.data)
  real_std = (images[:512].astype(np.float32) / 127.5 - 1).std(0).mean()
  state = state_lib.init_state(c, mesh)
  steps = phases.Steps(c, mesh)
  batches = data_lib.BatchIterator(images, c.train.batch_size, c.seed)
  z = np.random.default_rng(5).standard_normal((64, c.model.z_dim)).astype(np.float32)

  def ratio(params):
    img = generate_lib.generate(params, state.w_avg, c, z).astype(np.float32) / 127.5 - 1
    return float(img.std(0).mean() / real_std)

  start = time.time()
  for s in range(c.train.num_steps):
    state, metrics = steps.train_step(state, mesh_lib.shard_batch(next(batches), mesh), s)
    if (s + 1) % 100 == 0:
      m = jax.device_get(metrics)
      print(f'{args.name} step {s + 1}: diversity G {ratio(state.g_params):.3f} '
            f'G_ema {ratio(state.g_ema_params):.3f}  D(real) {m["D/real_logits"]:.2f} '
            f'D(fake) {m["D/fake_logits"]:.2f}  p {m["augment/p"]:.3f}', flush=True)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  imageio.save_image(imageio.make_grid(generate_lib.generate(state.g_ema_params, state.w_avg,
                                                             c, z)[:16]), out / f'{args.name}.png')
  print(f'{args.name}: {time.time() - start:.0f} s; grid {out / args.name}.png')


if __name__ == '__main__':
  main()
