"""Sampling from a trained run: N numbered images, a grid, and the progressive figure."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import matplotlib
import tqdm

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from common import imageio, logs, lora, mesh as mesh_lib
from ddpm import train
from ddpm.configs import default as default_config


def restore_params(config, workdir: str | Path, use_ema: bool = True):
  """(model, parameters (EMA by default)) from the workdir's latest checkpoint."""
  exp = train.Experiment(config)
  return exp.model, exp.sampling_params(workdir, use_ema)


def generate(config, workdir: str | Path) -> Path:
  """Writes config.sample.num_images images as OUT/1.jpg ... OUT/N.jpg.

  OUT holds nothing else (HW6 submits the folder as it is); the grid and the
  progressive figure go beside it as OUT_grid.png and OUT_progressive.png.
  """
  default_config.validate(config)
  s = config.sample
  out = Path(s.output_dir or Path(workdir) / 'samples')
  exp = train.Experiment(config)
  model, params, schedule = exp.model, exp.sampling_params(workdir, s.use_ema), exp.schedule
  params = lora.apply_files(params, s.adapters)
  mesh = exp.mesh
  sample_fn = train.make_sample_fn(config, model, schedule)
  batch = mesh_lib.device_batch(s.batch_size, s.num_images, mesh)
  rng = jax.random.PRNGKey(s.seed)
  noise = lambda key: jax.device_put(train.noise_like_batch(key, batch, config),
                                     mesh_lib.data_sharding(mesh))
  with logs.Timed(f'compiling the {s.sampler} sampler ({_steps(config)} steps)'):
    sample_fn = sample_fn.lower(params, rng, noise(rng)).compile()
  written, start = 0, time.perf_counter()
  with tqdm.tqdm(total=s.num_images, desc=f'{s.sampler} x{_steps(config)}', unit='img') as bar:
    while written < s.num_images:
      rng, noise_rng, step_rng = jax.random.split(rng, 3)
      x = imageio.to_uint8(mesh_lib.gather(sample_fn(params, step_rng, noise(noise_rng))))
      x = x[:s.num_images - written]
      if jax.process_index() == 0:
        imageio.write_numbered(x, out, start=written + 1)
        if written == 0:
          imageio.save_grid(x[:64], out.parent / f'{out.name}_grid.png')
      written += len(x)
      bar.update(len(x))
  elapsed = time.perf_counter() - start
  logging.info('Wrote %d images to %s/1.jpg ... in %.1f s (%.2f img/s); grid: %s.',
               written, out, elapsed, written / elapsed, out.parent / f'{out.name}_grid.png')
  if s.progressive:  # Every process computes (params are global arrays); process 0 writes.
    progressive_figure(config, model, params, schedule, out.parent / f'{out.name}_progressive.png')
  return out


def _steps(config) -> int:
  return config.diffusion.num_timesteps if config.sample.sampler == 'ddpm' else config.sample.num_steps


def progressive_figure(config, model, params, schedule, path: Path, num_samples: int = 5,
                       num_stages: int = 10) -> Path:
  """HW6 question 1: rows of samples, columns from pure noise (left) to the image (right)."""
  sample_fn = train.make_sample_fn(config, model, schedule, num_snapshots=num_stages)
  x_T = train.noise_like_batch(jax.random.PRNGKey(config.sample.seed + 7), num_samples, config)
  _, snaps, snap_t = sample_fn(params, jax.random.PRNGKey(config.sample.seed + 8), x_T)
  snaps = imageio.to_uint8(mesh_lib.gather(snaps))  # [K, N, H, W, 3]
  if jax.process_index() != 0:
    return path
  k = snaps.shape[0]
  fig, axes = plt.subplots(num_samples, k, figsize=(1.2 * k, 1.2 * num_samples + 0.4),
                           squeeze=False)
  for j in range(k):
    axes[0, j].set_title(f't={int(snap_t[j])}', fontsize=8)
    for i in range(num_samples):
      axes[i, j].imshow(snaps[j, i], interpolation='nearest')
      axes[i, j].axis('off')
  fig.suptitle(f'{config.sample.sampler} ({_steps(config)} steps): noise to image', fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  logging.info('Wrote the progressive-generation figure to %s.', path)
  return path
