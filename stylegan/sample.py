"""Sampling from a trained StyleGAN: `1.jpg … N.jpg` (HW6's format) plus a grid.

Uses G_ema and the tracked w average from the latest checkpoint in workdir.
Truncation psi < 1 (config.sample.psi, e.g. --config.sample.psi=0.7) trades
variety for quality: better AFD, usually worse FID.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from common import experiment, imageio
from stylegan import generate as generate_lib
from stylegan import train


def sample_images(config: ml_collections.ConfigDict, workdir: str | Path, num_images: int,
                  psi: float | None = None, seed: int | None = None) -> np.ndarray:
  """uint8 [num_images, R, R, 3] from the latest checkpoint's G_ema."""
  s = config.sample
  psi = s.psi if psi is None else psi
  seed = s.seed if seed is None else seed
  exp = train.Experiment(config)
  exp.validate()
  state = experiment.restore_for_sampling(
      exp, workdir, 'train first with --mode=train and the same --workdir.')
  z = np.random.default_rng(seed).standard_normal((num_images, config.model.z_dim))
  return generate_lib.generate(
      state.g_ema_params, state.w_avg, config, z.astype(np.float32), psi=psi,
      cutoff=s.truncation_cutoff, noise_mode=s.noise_mode, noise_seed=seed,
      batch_size=s.batch_size)


def generate(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
  """Writes config.sample.num_images images as OUT/1.jpg ... OUT/N.jpg.

  OUT (sample.output_dir, default WORKDIR/samples) holds nothing else, since
  HW6 submits the folder as it is; the grid of the first 64 goes beside it as
  OUT_grid.png (the same layout as the diffusion models').
  """
  s = config.sample
  out = Path(s.output_dir or Path(workdir) / 'samples')
  start = time.perf_counter()
  images = sample_images(config, workdir, s.num_images)
  if jax.process_index() == 0:
    imageio.write_numbered(images, out)
    grid = out.parent / f'{out.name}_grid.png'
    imageio.save_grid(images[:64], grid)
    logging.info('Wrote %d images (psi=%s) to %s/1.jpg ... %d.jpg in %.1f s, and the grid %s.',
                 len(images), s.psi, out, len(images), time.perf_counter() - start, grid)
  return out
