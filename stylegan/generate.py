"""Images from a generator's parameters: z -> uint8 pictures, with truncation.

`generate` is what the training grids (stylegan.train) and --mode=sample
(stylegan.sample) both call: one jitted G(z, w_avg, psi, cutoff) per model and
noise mode (cached), run in batches with the noise drawn from `noise_seed`.
`fixed_latents` are the grid's z, the same for every grid of a run.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import imageio
from common import mesh as mesh_lib
from stylegan.state import build_models, make_key


def generate(g_params, w_avg, config: ml_collections.ConfigDict, z: np.ndarray,
             psi: float = 1.0, cutoff: int = 0, noise_mode: str = 'const',
             noise_seed: int = 0, batch_size: int = 64) -> np.ndarray:
  """z [N, z_dim] -> uint8 images [N, R, R, 3] with truncation (psi, cutoff)."""
  fn = _generate_fn(json.dumps(config.model.to_dict(), sort_keys=True), noise_mode, cutoff or None)
  out = []
  for i in range(0, len(z), batch_size):
    key = jax.random.fold_in(make_key(noise_seed), i)
    img = fn(g_params, w_avg, jnp.asarray(z[i:i + batch_size]), jnp.float32(psi), key)
    out.append(imageio.to_uint8(mesh_lib.gather(img)))
  return np.concatenate(out)


@functools.lru_cache(maxsize=8)
def _generate_fn(model_json: str, noise_mode: str, cutoff: int | None):
  g, _ = build_models(ml_collections.ConfigDict({'model': json.loads(model_json)}))

  @jax.jit
  def fn(g_params, w_avg, z, psi, key):
    return g.apply({'params': g_params}, z, w_avg, psi, cutoff, noise_mode, rngs={'noise': key})
  return fn


def fixed_latents(config: ml_collections.ConfigDict, n: int) -> np.ndarray:
  """The same z for every grid of a run (and of a resumed run)."""
  rng = np.random.default_rng([config.seed, 2024])
  return rng.standard_normal((n, config.model.z_dim)).astype(np.float32)
