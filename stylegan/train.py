"""StyleGAN2 on common's driver: the `Experiment` and `train_and_evaluate`.

The driver is the shared one (common.experiment): `Experiment` supplies the
data, the state (stylegan.state), the phases as one step object
(stylegan.phases) and the G_ema grid hook (stylegan.generate); the loop,
resume, SIGTERM save, NaN stop, metric averaging, sharding (config.mesh,
config.params) and checkpoints are common's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import ml_collections
import numpy as np

from common import data as data_lib
from common import errors
from common import experiment
from common import imageio
from common import logs
from common import loop
from metrics import diversity
from stylegan import phases
from stylegan.configs import base as config_lib
from stylegan.generate import fixed_latents, generate
from stylegan.state import TrainState, create_state, make_key


def _grid_hook(writer, workdir: Path, config, reals: np.ndarray):
  """fn(step, state): G_ema's grid from fixed latents, and its diversity against the data.

  The grid goes to TensorBoard and WORKDIR/samples_during_training/<step>.png; the
  diversity (metrics.diversity: mean pairwise distance of 64 samples over that of 64
  reals) is logged, so a collapse (every z giving one image, ratio near 0) shows early.
  """
  n = max(config.train.num_grid_samples, 64)
  z = fixed_latents(config, n)
  real_sample = reals[np.random.default_rng(config.seed).permutation(len(reals))[:n]]

  def hook(step: int, state: TrainState) -> None:
    images = generate(state.g_ema_params, state.w_avg, config, z,
                      batch_size=config.sample.batch_size)
    grid = imageio.make_grid(images[:config.train.num_grid_samples])
    logs.write_image_grid(writer, step, 'samples/G_ema', grid)
    ratio = diversity.diversity_ratio(images, real_sample)
    writer.write_scalars(step, {'diversity/G_ema': ratio})
    if jax.process_index() == 0:
      logging.info('step %d: G_ema diversity %.3f of the data\'s (1 = as varied as the data).',
                   step, ratio)
      imageio.save_image(grid, workdir / 'samples_during_training' / f'{step:08d}.png')
  return hook


class Experiment(experiment.Experiment):
  """StyleGAN2 on the shared driver: G, D, G_ema and their optimisers in one state; each
  step runs the phases (common.loop.run calls the `phases.Steps` object); G_ema grids and
  diversity every train.sample_every steps."""
  name = 'G and D'
  run_keys = config_lib.RUN_KEYS

  def validate(self):
    config_lib.validate(self.config)

  def setup(self):
    self.images = data_lib.load_dataset(self.config.data)
    if self.images.shape[1:3] != (self.config.model.resolution,) * 2:
      raise errors.DataError(f'Data images are {self.images.shape[1:3]} but model.resolution='
                             f'{self.config.model.resolution}.')

  def init_state(self):
    return create_state(self.config, make_key(self.config.seed))

  def param_trees(self, state):
    return {'G': state.g_params, 'D': state.d_params}

  def make_step(self, shardings):
    return phases.get_steps(self.config, self.mesh)

  def batches(self, start):
    t = self.config.train
    return data_lib.BatchIterator(self.images, t.batch_size, self.config.seed, step=start)

  def scalars(self, step):
    return {**super().scalars(step), 'kimg': step * self.config.train.batch_size / 1000.0}

  def hooks(self, writer):
    return [loop.Hook(self.config.train.sample_every,
                      _grid_hook(writer, self.workdir, self.config, self.images),
                      'sampling the G_ema grid')]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
  """Trains (resuming from workdir's last checkpoint) until train.num_steps."""
  return experiment.train_and_evaluate(Experiment(config), workdir)
