"""Run by test_seam.py in a subprocess with 8 fake CPU devices: one train step of the ddpm and
the LDM denoiser under several (data, fsdp) meshes, per-device state bytes, and checkpoints
restored across layouts. Prints one JSON line (RESULT {...}) for the test to check.
"""

import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import checkpoint, data, mesh as mesh_lib  # pylint: disable=wrong-import-position
from ddpm import train  # pylint: disable=wrong-import-position
from latent.ldm import train as ldm_train  # pylint: disable=wrong-import-position
from latent.configs import ldm_base  # pylint: disable=wrong-import-position
from test_ddpm_train import tiny_config  # pylint: disable=wrong-import-position
from test_latent_ldm import tiny_cached_ldm  # pylint: disable=wrong-import-position

LAYOUTS = {'1 device': (1, 1), 'data=8': (8, 1), 'data=2 fsdp=4': (2, 4), 'fsdp=8': (1, 8)}


def mesh_for(data_size: int, fsdp: int):
  c = mesh_lib.get_config()
  c.fsdp = fsdp
  return mesh_lib.make_mesh(c, jax.devices()[:data_size * fsdp])


def layout_config(config):
  config.params.min_shard_size = 0  # Shard even the tiny test arrays.
  # Adam's first step is lr * g / (|g| + eps): with eps 1e-8 a gradient that is zero in exact
  # arithmetic (a bias before a GroupNorm) turns reduction-order noise into +-lr updates.
  config.optim.eps = 1e-4
  config.optim.warmup_steps = 0
  return config


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def ddpm_case():
  config = layout_config(tiny_config())
  model, schedule, tx = train.build_model(config), train.build_schedule(config), train.make_optimizer(config)
  batch = next(data.BatchIterator(data.load_dataset(config.data), 16, seed=0))
  out, state_bytes = {}, {}
  for name, (d, f) in LAYOUTS.items():
    mesh = mesh_for(d, f)
    state = train.create_train_state(config, model, tx, mesh)
    state_bytes[name] = mesh_lib.per_device_bytes((state.params, state.ema_params, state.opt_state))
    step = train.make_train_step(config, model, schedule, tx, mesh)
    state, metrics = step(state, mesh_lib.shard_batch(batch, mesh))
    out[name] = (float(metrics['loss']), flat(jax.device_get(state.params)))
  return out, state_bytes


class FakeCodec:
  """Stands in for the VAE: the LDM step reads cached posterior moments, not images."""
  scale_factor = 0.5


def ldm_case():
  config = layout_config(ldm_base.get_config())
  config.vae_workdir = 'unused'
  config.conditioning.width = 32
  config.model.block_out_channels = (16, 32)
  config.model.layers_per_block = 1
  config.model.attention_resolutions = (4,)
  config.model.head_dim = 8
  config.model.norm_groups = 8
  config.diffusion.num_timesteps = 100
  model, batch = tiny_cached_ldm()
  schedule, tx = train.build_schedule(config), train.make_optimizer(config)
  init = lambda: ldm_train.init_state(config, model, tx)
  step_fn = lambda state, b, vae: ldm_train.train_step(
      state, b, vae, config=config, model=model, schedule=schedule, tx=tx, stage1=FakeCodec(),
      rules=train.rules_of(config))
  out = {}
  for name, (d, f) in LAYOUTS.items():
    mesh = mesh_for(d, f)
    shardings = train.state_shardings(config, init, mesh)
    state = jax.jit(init, out_shardings=shardings)()
    step = jax.jit(step_fn, in_shardings=(shardings, mesh_lib.data_sharding(mesh), None),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)))
    state, metrics = step(state, mesh_lib.shard_batch(batch, mesh), {})
    out[name] = (float(metrics['loss']), flat(jax.device_get(state.params)))
  return out


def restore_case():
  """A checkpoint written under one layout, restored under others (Orbax, target shardings)."""
  config = layout_config(tiny_config())
  model, tx = train.build_model(config), train.make_optimizer(config)
  init = lambda: train.init_state(config, model, tx)
  checks = {}
  for write, reads in (('data=2 fsdp=4', ('1 device', 'data=8')),
                       ('data=8', ('data=2 fsdp=4', 'fsdp=8'))):
    with tempfile.TemporaryDirectory() as tmp:
      state = train.create_train_state(config, model, tx, mesh_for(*LAYOUTS[write]))
      state = state.replace(step=state.step + 7)
      ckpt = checkpoint.Checkpointer(tmp, async_save=False)
      ckpt.save(7, state, force=True)
      ckpt.close()
      for read in reads:
        mesh = mesh_for(*LAYOUTS[read])
        shardings = train.state_shardings(config, init, mesh)
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              jax.eval_shape(init), shardings)
        restored = checkpoint.restore_latest(tmp, target, '')
        same_values = bool(np.array_equal(flat(jax.device_get(restored)), flat(jax.device_get(state))))
        laid_out = all(x.sharding == sh for x, sh in zip(jax.tree.leaves(restored),
                                                           jax.tree.leaves(shardings)))
        checks[f'{write} -> {read}'] = same_values and laid_out and int(restored.step) == 7
  return checks


def main():
  assert jax.device_count() == 8, jax.device_count()
  ddpm, state_bytes = ddpm_case()
  ldm = ldm_case()
  report = {'state_bytes': state_bytes, 'restore': restore_case()}
  for model, out in (('ddpm', ddpm), ('ldm', ldm)):
    loss0, params0 = out['1 device']
    report[model] = {name: {'loss_rel': abs(loss - loss0) / abs(loss0),
                            'params_close': bool(np.allclose(p, params0, rtol=1e-5, atol=1e-7)),
                            'params_max_abs': float(np.max(np.abs(p - params0)))}
                     for name, (loss, p) in out.items()}
  print('RESULT', json.dumps(report))


if __name__ == '__main__':
  main()
