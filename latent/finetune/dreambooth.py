"""DreamBooth's prior preservation (Ruiz et al. 2023): class images from the base model,
made once into the workdir, and batches that pair concept and class examples."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from common import atomic, imageio, logs, mesh as mesh_lib
from latent.ldm import sampler

CLASS_IMAGES = 'class_images'


def class_images(workdir: Path, config, model, params, stage1, conds, schedule,
                 options: dict) -> np.ndarray:
  """finetune.num_class_images images of concept.class_prompt from the base model, written
  to WORKDIR/class_images/N.png once. An interrupted run continues where it stopped; images
  made with other settings (prompt, sampler, base) are made again."""
  f, s = config.finetune, config.sample
  folder = workdir / CLASS_IMAGES
  made_with = {'class_prompt': config.concept.class_prompt, 'base': config.base_workdir or
               config.pipeline, 'seed': config.seed, 'sampler': s.sampler, 'steps': s.num_steps,
               'guidance_scale': s.guidance_scale, 'batch_size': s.batch_size}
  info = folder / 'made_with.json'
  n, b = f.num_class_images, s.batch_size
  if info.is_file() and json.loads(info.read_text()) == made_with:
    have = 0
    while have < n and (folder / f'{have + 1}.png').is_file():
      have += 1
    have -= have % b if have < n else 0  # Restart at a batch boundary: the same noise.
  else:
    have = 0
  if jax.process_count() > 1:  # Every process runs the (sharded) sampler as often.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    have = int(multihost_utils.broadcast_one_to_all(np.int32(have)))
  if have < n:
    if jax.process_index() == 0:
      folder.mkdir(parents=True, exist_ok=True)
      info.write_text(json.dumps(made_with))
    sample_fn = sampler.for_config(config, model, schedule, stage1, options)
    u = model.unet
    ids = conds.prompt_ids([config.concept.class_prompt])
    with logs.Timed(f'generating {n - have} prior images of {config.concept.class_prompt!r} '
                    f'with the base model (once, into {folder})'):
      for i in range(have, n, b):
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 3), i)
        noise_key, step_key = jax.random.split(key)
        m = min(b, n - i)
        noise = jax.random.normal(noise_key, (m, u.sample_size, u.sample_size, u.in_channels))
        x = sample_fn(params, stage1.params, step_key, jnp.repeat(ids, m, axis=0), noise,
                      s.guidance_scale)
        images = imageio.to_uint8(mesh_lib.gather(x))
        if jax.process_index() == 0:
          for j, image in enumerate(images):  # Never a half-written image.
            atomic.write_file(folder / f'{i + j + 1}.png',
                              lambda path, image=image: imageio.save_image(image, path))
    mesh_lib.barrier('class images')
  return np.stack([imageio.read_image(folder / f'{i + 1}.png') for i in range(n)])


class PairedBatches:
  """Concept batches followed by prior batches, with per-example loss weights such that the
  step's mean over the batch is diffusers' train_dreambooth.py loss: the concept half's mean
  plus prior_weight times the prior half's mean (not half of it, which would also halve the
  gradient that train.grad_clip_norm clips)."""

  def __init__(self, concept, prior, prior_weight: float):
    self.concept, self.prior, self.prior_weight = concept, prior, prior_weight

  def __iter__(self):
    return self

  def __next__(self):
    a, b = next(self.concept), next(self.prior)
    out = {k: np.concatenate([a[k], b[k]]) for k in a}
    n_a, n_b = len(a['ids']), len(b['ids'])
    out['weight'] = np.concatenate([np.full(n_a, (n_a + n_b) / n_a, np.float32),
                                    np.full(n_b, self.prior_weight * (n_a + n_b) / n_b,
                                            np.float32)])
    return out
