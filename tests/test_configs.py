"""The config convention: one base config per package (every key + `validate`), experiment
configs that import only their base, and no model code behind any config module.

Bases: ddpm/configs/default.py and sr_base.py (super-resolution), latent/configs/vae_base.py
and ldm_base.py (the two stages), stylegan/configs/base.py. Choice lists that the model code
also needs (samplers, schedules, losses, noise modes, augmentations) are defined in the bases;
the model modules import them from there, or keep a registry keyed by the same names (checked
here).
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_PACKAGES = ('ddpm', 'latent', 'stylegan', 'metrics')
CONFIG_PACKAGES = ('ddpm.configs', 'latent.configs', 'stylegan.configs')
BASES = {
    'ddpm.configs': ('ddpm.configs.default', 'ddpm.configs.sr_base'),
    'latent.configs': ('latent.configs.vae_base', 'latent.configs.ldm_base',
                       'latent.configs.finetune_base', 'latent.configs.sd_pipeline'),
    'stylegan.configs': ('stylegan.configs.base',),
}
ALL_BASES = tuple(b for bases in BASES.values() for b in bases)


def _config_modules() -> list[str]:
  """Every module of the three configs packages (found on disk, nothing imported)."""
  names = []
  for package in CONFIG_PACKAGES:
    folder = REPO.joinpath(*package.split('.'))
    names += [f'{package}.{m.name}' for m in pkgutil.iter_modules([str(folder)])]
  return sorted(names)


def _imports(module: str) -> set[str]:
  """The modules a config module imports (`from a.b import c` counts as a.b.c when that
  is a module of the repo, else a.b)."""
  path = REPO.joinpath(*module.split('.')).with_suffix('.py')
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != '__future__':
      for alias in node.names:
        sub = f'{node.module}.{alias.name}'
        is_module = REPO.joinpath(*sub.split('.')).with_suffix('.py').exists()
        found.add(sub if is_module else node.module)
  return found


def _base_of(module: str) -> str | None:
  """The base an experiment config builds on: the one base of its package it imports, directly
  or through another experiment config of the package (ldm_anime_class on ldm_anime_text)."""
  package = module.rsplit('.', 1)[0]
  imported = _imports(module)
  bases = [b for b in BASES[package] if b in imported]
  siblings = [m for m in imported if m.startswith(package + '.') and m not in ALL_BASES]
  if not bases and len(siblings) == 1:
    return _base_of(siblings[0])
  assert len(bases) == 1, f'{module} must import exactly one of {BASES[package]}, got {bases}.'
  return bases[0]


EXPERIMENTS = [m for m in _config_modules() if m not in ALL_BASES]


def test_every_package_has_its_base_and_experiment_configs():
  modules = _config_modules()
  for bases in BASES.values():
    for base in bases:
      assert base in modules
  assert 'stylegan.config' not in modules
  assert not REPO.joinpath('stylegan', 'config.py').exists(), (
      "StyleGAN's base config lives in stylegan/configs/base.py.")
  assert EXPERIMENTS, 'no experiment configs found'


@pytest.mark.parametrize('module', EXPERIMENTS)
def test_experiment_configs_import_only_their_base(module):
  base = _base_of(module)
  package = module.rsplit('.', 1)[0]
  for name in _imports(module):
    top = name.split('.')[0]
    assert name.startswith(package + '.') or top in ('ml_collections', 'common'), (
        f'{module} imports {name}: experiment configs import only their package\'s configs '
        f'(base: {base}), ml_collections and common.')


@pytest.mark.parametrize('base', ALL_BASES)
def test_bases_import_no_model_package_but_configs(base):
  for name in _imports(base):
    top = name.split('.')[0]
    assert top not in MODEL_PACKAGES or '.configs.' in f'{name}.', f'{base} imports {name}.'
    assert '.configs' not in name or name in ALL_BASES, f'{base} imports {name}, not a base.'


# What runs in a fresh interpreter: import every config module, build every config, validate
# each shipped experiment config with its base, then list the modules of the model packages
# that got imported on the way.
_PROBE = r'''
import importlib, json, sys
modules, bases, packages = json.loads(sys.argv[1])
for name in modules:
  importlib.import_module(name).get_config()
validated = []
for name, base in sorted(bases.items()):
  config = importlib.import_module(name).get_config()
  if config.get('stage') == 'ldm' and not config.vae_workdir:
    config.vae_workdir = 'runs/vae'  # ldm_base.validate wants the stage-1 workdir named.
  if config.get('stage') == 'finetune':
    config.base_workdir, config.data.path = 'runs/ldm', 'concept'  # Likewise the base and data.
  importlib.import_module(base).validate(config)
  validated.append(name)
loaded = sorted(m for m in sys.modules if m.split('.')[0] in packages)
print(json.dumps(dict(loaded=loaded, validated=validated)))
'''


def test_configs_build_validate_and_import_no_model_code():
  modules = _config_modules()
  bases = {m: _base_of(m) for m in EXPERIMENTS}
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  proc = subprocess.run([sys.executable, '-c', _PROBE, json.dumps([modules, bases, MODEL_PACKAGES])], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert sorted(result['validated']) == sorted(bases)
  # The packages themselves (docstring-only __init__s) are on the way to their configs.
  model_code = [m for m in result['loaded']
                if m not in MODEL_PACKAGES and '.configs' not in m]
  assert not model_code, f'config modules pulled in model code: {model_code}'
  assert 'latent.configs.ldm_base' in result['loaded']  # The probe did run.


# --- The names defined in the bases agree with the model code that uses them -----------------
# Each choice a base offers must do what its name says in the model code, and the model code
# must offer no name the base leaves out (a registry keyed separately is compared key for key).

def test_ddpm_predictions_mean_what_they_say():
  """Each diffusion.prediction: the model output that is exactly its target has zero loss, and
  the sampler's conversion of that output gives back x_0 and eps; other names are refused."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm import diffusion, schedules  # pylint: disable=g-import-not-at-top
  from ddpm.configs import default  # pylint: disable=g-import-not-at-top
  s = schedules.make_schedule('cosine', 100)
  k0, k1 = jax.random.split(jax.random.PRNGKey(0))
  x0 = jax.random.uniform(k0, (4, 4, 4, 3), minval=-1, maxval=1)
  eps = jax.random.normal(k1, x0.shape)
  t = np.array([0, 10, 50, 99])
  targets = {'eps': eps, 'x0': x0, 'v': diffusion.velocity(s, x0, t, eps)}
  assert set(targets) == set(default.PREDICTIONS)
  xt = diffusion.q_sample(s, x0, t, eps)
  for name, target in targets.items():
    loss, _ = diffusion.denoising_loss(s, lambda xt, t, y=target: y, x0, t, eps, name)
    assert float(loss) < 1e-10, name
    wrong, _ = diffusion.denoising_loss(s, lambda xt, t, y=target: y + 1.0, x0, t, eps, name)
    assert float(wrong) > 0.5, name
    got_x0, got_eps = diffusion.to_x0_eps(s, name, target, xt, t)
    # eps at t = 0 is hard to recover from an x0 target (divided by sqrt(1 - alpha_bar) ~ 0).
    np.testing.assert_allclose(got_x0, x0, atol=2e-3, err_msg=name)
    np.testing.assert_allclose(got_eps[1:], eps[1:], atol=2e-3, err_msg=name)
  for fn in (lambda: diffusion.denoising_loss(s, lambda xt, t: eps, x0, t, eps, 'score'),
             lambda: diffusion.to_x0_eps(s, 'score', eps, xt, t)):
    with pytest.raises(ValueError, match='score'):
      fn()


def test_ddpm_spacings_schedules_and_samplers_are_the_model_code_names():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm import samplers, schedules  # pylint: disable=g-import-not-at-top
  from ddpm.configs import default  # pylint: disable=g-import-not-at-top
  assert tuple(samplers.SAMPLERS) == default.SAMPLERS       # The registries' keys.
  assert tuple(schedules.SCHEDULES) == default.SCHEDULES
  # Every spacing: S distinct descending timesteps in [0, T); other names refused.
  for spacing in default.SPACINGS:
    ts = samplers.timesteps(1000, 10, spacing)
    assert len(set(ts.tolist())) == 10 and ts[0] > ts[-1] and 0 <= ts.min() and ts.max() < 1000
  with pytest.raises(ValueError, match='spacing'):
    samplers.timesteps(1000, 10, 'uniform')
  # Every schedule: T betas in (0, 1).
  for name in default.SCHEDULES:
    betas = np.asarray(schedules.make_schedule(name, 50).betas)
    assert betas.shape == (50,) and (betas > 0).all() and (betas < 1).all(), name
  # Every sampler name of the config runs, through the config mapping, from noise to the
  # data point an oracle (x0-prediction) model points at.
  config = default.get_config()
  config.diffusion.prediction, config.sample.num_steps = 'x0', 4
  s = schedules.make_schedule('cosine', 50)
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 4, 3), minval=-0.9, maxval=0.9)
  x_T = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  for name in default.SAMPLERS:
    config.sample.sampler = name
    options = samplers.options_from_config(config)
    out = jax.jit(lambda x: samplers.sample(s, lambda xt, t: x0, x, jax.random.PRNGKey(2),
                                            **options))(x_T)
    np.testing.assert_allclose(out, x0, atol=2e-3, err_msg=name)


def test_latent_vae_choices_and_checks_are_the_model_code_names(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from common import errors  # pylint: disable=g-import-not-at-top
  from latent.configs import vae_base  # pylint: disable=g-import-not-at-top
  from latent.vae import loss as vae_loss, lpips  # pylint: disable=g-import-not-at-top
  # Every reconstruction loss: its sum over pixels, per example.
  x, recon = jnp.zeros((2, 2, 2, 1)), jnp.full((2, 2, 2, 1), 2.0)
  expected = {'l1': 8 * 2.0 / 2, 'l2': 8 * 4.0 / 2, 'l1+l2': 8 * 6.0 / 2}  # 8 pixels, 2 examples.
  assert set(expected) == set(vae_base.REC_LOSSES)
  for kind, value in expected.items():
    assert float(vae_loss.reconstruction_loss(x, recon, kind)) == value, kind
  with pytest.raises(KeyError):
    vae_loss.reconstruction_loss(x, recon, 'huber')
  # Every discriminator norm is a different network ('none': no norm layers), and the
  # config's output-size check is the network's logit map.
  names = {}
  for norm in vae_base.DISC_NORMS:
    for size, layers in ((32, 2), (64, 3), (16, 2)):
      disc = vae_loss.NLayerDiscriminator(channels=8, num_layers=layers, norm=norm)
      shapes = jax.eval_shape(disc.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
      out = jax.eval_shape(disc.apply, shapes, jnp.zeros((1, size, size, 3)))
      side = vae_base.discriminator_output_size(size, layers)
      assert out.shape == (1, side, side, 1), (norm, size, layers, out.shape)
    names[norm] = {k for k in shapes['params'] if k.startswith('norm_')}
  assert names['none'] == set() and names['group'], names
  # LPIPS: the arrays validate asks for are the network's; a file with them passes the
  # config check and loads, one without one of them fails both.
  assert set(vae_base.LPIPS_KEYS) == set(lpips.param_shapes())
  good = tmp_path / 'lpips.npz'
  np.savez(good, **{k: np.zeros(shape, np.float32) for k, shape in lpips.param_shapes().items()})
  vae_base.check_lpips(1.0, str(good))
  lpips.load_params(good)
  bad = tmp_path / 'bad.npz'
  np.savez(bad, **{k: np.zeros(shape, np.float32)
                   for k, shape in list(lpips.param_shapes().items())[1:]})
  with pytest.raises(errors.ConfigError, match='lacks'):
    vae_base.check_lpips(1.0, str(bad))
  with pytest.raises(errors.DataError, match='missing'):
    lpips.load_params(bad)
  # The command every message gives is the converter's own command line.
  command = vae_base.lpips_convert_command(str(tmp_path / 'made.npz')).split(' (')[0].split()
  assert command[:3] == ['python', '-m', 'latent.lpips']
  import importlib.util  # pylint: disable=g-import-not-at-top
  assert importlib.util.find_spec('latent.lpips') is not None
  converted = {}
  monkeypatch.setattr(lpips, 'convert', lambda vgg, lin: converted.update(vgg=vgg, lin=lin)
                      or {'a': np.zeros(1, np.float32)})
  lpips.main(command[3:])
  assert converted == {'vgg': 'vgg16-397923af.pth', 'lin': 'vgg.pth'}
  assert (tmp_path / 'made.npz').is_file()


def test_stylegan_choice_lists_are_the_model_code_names():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from stylegan import augment, networks  # pylint: disable=g-import-not-at-top
  from stylegan.configs import base  # pylint: disable=g-import-not-at-top
  assert tuple(augment._OPS) == base.AUGMENTATIONS  # pylint: disable=protected-access
  # Every augmentation changes images; the policy parser refuses other names.
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 3), minval=-1, maxval=1)
  for name in base.AUGMENTATIONS:
    assert not np.allclose(augment.augment(jax.random.PRNGKey(1), x, (name,), 1.0), x), name
  with pytest.raises(ValueError, match='zoom'):
    augment.augment(jax.random.PRNGKey(1), x, ('zoom',), 1.0)
  # Noise modes: 'random' draws per call, 'const' is one fixed noise, 'none' adds nothing.
  net = networks.SynthesisNetwork(resolution=32, channel_base=64, channel_max=8)
  ws = jax.random.normal(jax.random.PRNGKey(2), (2, networks.num_ws_for(32), 8))
  params = net.init({'params': jax.random.PRNGKey(3), 'noise': jax.random.PRNGKey(4)}, ws)
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.ones_like(v) if 'noise_strength' in jax.tree_util.keystr(path) else v,
      params)
  run = lambda mode, seed: np.asarray(net.apply(params, ws, mode,
                                                rngs={'noise': jax.random.PRNGKey(seed)}))
  out = {mode: (run(mode, 5), run(mode, 6)) for mode in base.NOISE_MODES}
  assert set(out) == {'random', 'const', 'none'}
  assert not np.allclose(*out['random'])
  np.testing.assert_array_equal(*out['const'])
  np.testing.assert_array_equal(*out['none'])
  assert not np.allclose(out['const'][0], out['none'][0])
  with pytest.raises(ValueError, match='noise_mode'):
    run('fixed', 5)


def test_from_file_applies_overrides_as_literals():
  """Scripts (benchmarks) load a config file the way `--config=FILE --config.KEY=VALUE` does."""
  from common import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.from_file(REPO / 'ddpm/configs/anime32.py', [
      '--config.model.block_out_channels=(16, 32)', 'train.batch_size=24',
      'sample.sampler=ddpm', 'diffusion.min_snr_gamma=0.0'])
  assert config.model.block_out_channels == (16, 32)
  assert config.train.batch_size == 24 and config.sample.sampler == 'ddpm'
  assert config.diffusion.min_snr_gamma == 0.0 and config.data.image_size == 32
