"""Teach a text LDM a hair colour it has never seen, with each fine-tuning method; score it.

The base (latent/configs/ldm_anime_text.py at 32x32, trained with every green-haired
face left out: `data.exclude_captions`) learns "sks hair" from a few of the left-out
green-haired faces. For each method this script fine-tunes, samples the concept prompt
and a set of ordinary colour prompts, and scores both with metrics.attributes
(animeface's hair colour vs the target):

  concept accuracy   share of "sks hair" samples (with a face) detected as green
  colour accuracy    hair-colour accuracy of "<colour> hair" prompts (drift: vs the base)

  python benchmarks/concept.py --base=runs/concept/base --out=runs/concept/ft

writes OUT/<method>/ (the fine-tuning runs and samples), OUT/results.json, a markdown
table on stdout and, with --figure / --drift_figure, the concept prompt / an ordinary
colour prompt before and after, one row per method.
A CPU-scale run: tiny models, 32x32 faces, minutes per method.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import imageio, logs, params as params_lib  # noqa: E402
from latent.finetune import artefacts, base as finetune_base, experiment  # noqa: E402
from latent.ldm import sample  # noqa: E402
from latent.configs import (finetune_dreambooth, finetune_hypernetwork,  # noqa: E402
                            finetune_lora, finetune_textual_inversion)
from metrics import attributes  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'anime_faces_mlds96_tagged'
COLOUR = 'green'
CONCEPT_PROMPT = 'sks hair'
COLOUR_PROMPTS = ('blonde', 'brown', 'black', 'blue', 'pink', 'purple')

# (row name, config module, overrides)
METHODS = {
    'dreambooth_prior': (finetune_dreambooth, {}),
    'dreambooth': (finetune_dreambooth, {'finetune.prior_preservation': False}),
    'textual_inversion': (finetune_textual_inversion, {}),
    'lora_r4': (finetune_lora, {'lora.rank': 4}),
    'lora_r16': (finetune_lora, {'lora.rank': 16}),
    'hypernetwork': (finetune_hypernetwork, {}),
}


def set_key(config, key, value):
  *parents, leaf = key.split('.')
  for p in parents:
    config = config[p]
  config[leaf] = value


def green_faces() -> list[str]:
  rows = imageio.read_caption_table(DATA / 'captions.tsv')
  return sorted(f for f, c in rows if attributes.hair_colour_from_caption(c) == COLOUR)


def concept_folder(out: Path, num: int, base_config, seed: int = 0) -> Path:
  """`num` faces whose caption's one hair colour is COLOUR, checked to be ones the base's
  data.exclude_captions left out (so the base never saw them)."""
  excluded = base_config.data.exclude_captions
  if not excluded:
    raise SystemExit(f'The base was trained on every face (data.exclude_captions is empty): '
                     f'it has seen {COLOUR} hair.')
  captions = dict(imageio.read_caption_table(DATA / 'captions.tsv'))
  picked = np.random.default_rng(seed).choice(green_faces(), num, replace=False)
  leaked = [f for f in picked if not re.search(excluded, captions[f], re.IGNORECASE)]
  if leaked:
    raise SystemExit(f'{leaked} were in the base\'s training data ({excluded!r} keeps them).')
  folder = out / 'concept'
  shutil.rmtree(folder, ignore_errors=True)
  folder.mkdir(parents=True)
  for name in picked:
    (folder / name).write_bytes((DATA / 'images' / name).read_bytes())
  return folder


def real_ceiling(num: int = 96) -> attributes.AttributeResult:
  """The measure on real green-haired faces at the generated size (32x32): its ceiling."""
  names = np.random.default_rng(1).choice(green_faces(), num, replace=False)
  images = np.stack([imageio.read_image(DATA / 'images' / f, 32) for f in names])
  return attributes.attribute_accuracy(images, [COLOUR] * num)


def sample_and_score(config, workdir: Path, out: Path, n_concept: int, n_colour: int):
  """(concept accuracy, colour accuracy, concept images) of a run's samples."""
  config = config.copy_and_resolve_references()
  s = config.sample
  s.sampler, s.num_steps, s.guidance_scale, s.batch_size = 'ddim', 50, 4.0, 64
  s.prompts, s.num_per_prompt, s.output_dir = (CONCEPT_PROMPT,), n_concept, str(out / 'concept')
  folder = sample.generate(config, workdir)
  concept = [folder / f'{i + 1}.jpg' for i in range(n_concept)]  # Prompt order.
  s.prompts = tuple(f'{c} hair' for c in COLOUR_PROMPTS)
  s.num_per_prompt, s.output_dir = n_colour, str(out / 'colours')
  folder = sample.generate(config, workdir)
  colours = [folder / f'{i + 1}.jpg' for i in range(n_colour * len(COLOUR_PROMPTS))]
  concept_acc = attributes.attribute_accuracy(concept, [COLOUR] * len(concept))
  colour_acc = attributes.attribute_accuracy(
      colours, [c for c in COLOUR_PROMPTS for _ in range(n_colour)])
  return concept_acc, colour_acc, concept


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--base', required=True, help='the base text LDM workdir')
  parser.add_argument('--out', required=True)
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--concept_images', type=int, default=8)
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--n_concept', type=int, default=48)
  parser.add_argument('--n_colour', type=int, default=16)
  parser.add_argument('--figure', default='', help='PNG: the concept prompt per method')
  parser.add_argument('--drift_figure', default='', help='PNG: an ordinary prompt per method')
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
  logs.quiet_library_logs()
  out = Path(args.out)
  base_config = finetune_base.read_base_config(args.base)
  path = out / 'results.json'
  settings = {k: v for k, v in vars(args).items()
              if k not in ('methods', 'figure', 'drift_figure')}
  results = json.loads(path.read_text()) if path.is_file() else {}
  if results.get('settings') != settings:  # Other settings: start again.
    results = {'settings': settings}
  folder = concept_folder(out, args.concept_images, base_config)
  if 'real' not in results:
    r = real_ceiling()
    results['real'] = {'concept': r.accuracy, 'concept_faces': r.detection_rate}

  if 'base' not in results:
    c_acc, col_acc, images = sample_and_score(base_config, Path(args.base), out / 'base',
                                              args.n_concept, args.n_colour)
    results['base'] = {'concept': c_acc.accuracy, 'concept_faces': c_acc.detection_rate,
                       'colours': col_acc.accuracy, 'colour_faces': col_acc.detection_rate}
    path.write_text(json.dumps(results, indent=1))

  for name in filter(None, args.methods.split(',')):
    if name in results:
      continue
    module, overrides = METHODS[name]
    config = module.get_config()
    config.base_workdir = args.base
    config.data.path = str(folder)
    config.concept.class_prompt = 'hair'
    config.train.num_steps = args.steps
    config.train.checkpoint_every = args.steps
    config.train.sample_every = args.steps
    for k, v in overrides.items():
      set_key(config, k, v)
    workdir = out / name
    shutil.rmtree(workdir, ignore_errors=True)  # A run from a crash would resume: time anew.
    start = time.perf_counter()
    state = experiment.train_and_evaluate(config, str(workdir))
    wall = time.perf_counter() - start
    rate = [v for _, v in logs.read_scalars(workdir, 'steps_per_sec')]
    trainable = sum(int(np.prod(x.shape)) for x in
                    jax.tree.leaves(params_lib.Rules(config.params).split(state.params)[0]))
    artefact = workdir / artefacts.ARTEFACTS.get(config.method, '')
    # DreamBooth's artefact is the fine-tuned U-Net itself (float32), not the checkpoint
    # folder (which also holds the optimiser state).
    size = artefact.stat().st_size if artefact.is_file() else 4 * trainable
    c_acc, col_acc, _ = sample_and_score(config, workdir, out / name / 'eval', args.n_concept,
                                         args.n_colour)
    results[name] = {'concept': c_acc.accuracy, 'concept_faces': c_acc.detection_rate,
                     'colours': col_acc.accuracy, 'colour_faces': col_acc.detection_rate,
                     'trainable': trainable, 'artefact_bytes': size,
                     'steps_per_sec': float(np.median(rate)) if rate else None, 'wall_s': wall,
                     'steps': args.steps}
    path.write_text(json.dumps(results, indent=1))
    logging.info('%s: %s', name, results[name])

  b, real = results['base'], results['real']
  print(f'| method | concept accuracy ("{CONCEPT_PROMPT}" -> {COLOUR}) | colour accuracy '
        '(drift; faces found) | trainable parameters | artefact | steps/s | wall |')
  print('|---|---|---|---|---|---|---|')
  print(f'| real {COLOUR}-haired faces at 32x32 (the measure\'s ceiling) | {real["concept"]:.2f} '
        f'(faces {real["concept_faces"]:.0%}) | - | - | - | - | - |')
  print(f'| base (never saw {COLOUR} hair) | {b["concept"]:.2f} (faces {b["concept_faces"]:.0%}) '
        f'| {b["colours"]:.2f} (faces {b["colour_faces"]:.0%}) | - | - | - | - |')
  for name in METHODS:
    if name not in results:
      continue
    r = results[name]
    size = r['artefact_bytes']
    size = f'{size / 2**20:.1f} MiB' if size > 2**20 else f'{size / 1024:.1f} KiB'
    print(f'| {name} | {r["concept"]:.2f} (faces {r["concept_faces"]:.0%}) | '
          f'{r["colours"]:.2f} ({r["colours"] - b["colours"]:+.2f}; faces {r["colour_faces"]:.0%}) '
          f'| {r["trainable"]:,} | {size} '
          f'| {r["steps_per_sec"] or 0:.1f} | {r["wall_s"]:.0f} s |')

  if args.figure:
    figure(out, 'concept', CONCEPT_PROMPT, args.figure)
  if args.drift_figure:  # The first colour prompt's first 8 images: what should not change.
    figure(out, 'colours', f'{COLOUR_PROMPTS[0]} hair', args.drift_figure)


def figure(out: Path, subdir: str, prompt: str, path: str, per_row: int = 8) -> None:
  """One captioned row of `prompt`'s first samples per model (base first)."""
  rows, names = [], []
  for name in ['base', *METHODS]:
    folder = out / ('base' if name == 'base' else f'{name}/eval') / subdir
    if folder.is_dir():
      rows.append(np.stack([imageio.read_image(folder / f'{i + 1}.jpg') for i in range(per_row)]))
      names.append(f'{prompt}: {name}')
  imageio.save_image(imageio.captioned_grid(np.concatenate(rows), names, per_row), path)
  print(f'Figure: {path}')

if __name__ == '__main__':
  main()
