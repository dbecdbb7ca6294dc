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

def test_ddpm_choice_lists_are_the_model_code_names():
  from ddpm import diffusion, samplers, schedules  # pylint: disable=g-import-not-at-top
  from ddpm.configs import default  # pylint: disable=g-import-not-at-top
  assert diffusion.PREDICTIONS is default.PREDICTIONS
  assert samplers.SPACINGS is default.SPACINGS
  assert tuple(samplers.SAMPLERS) == default.SAMPLERS       # The registries' keys.
  assert tuple(schedules.SCHEDULES) == default.SCHEDULES


def test_latent_choice_lists_and_checks_are_the_model_code_names():
  from latent import lpips, vae_loss  # pylint: disable=g-import-not-at-top
  from latent.configs import vae_base  # pylint: disable=g-import-not-at-top
  assert vae_loss.REC_LOSSES is vae_base.REC_LOSSES
  assert vae_loss.DISC_NORMS is vae_base.DISC_NORMS
  assert vae_loss.discriminator_output_size is vae_base.discriminator_output_size
  assert vae_loss.check_lpips is vae_base.check_lpips
  # LPIPS' weights file: the arrays validate asks for are the network's, and the command
  # its messages give is latent.lpips' own.
  assert set(vae_base.LPIPS_KEYS) == set(lpips.param_shapes())
  for out in ('lpips_vgg.npz', '/tmp/x.npz'):
    assert vae_base.lpips_convert_command(out) == lpips.convert_command(out)


def test_stylegan_choice_lists_are_the_model_code_names():
  from stylegan import augment, networks  # pylint: disable=g-import-not-at-top
  from stylegan.configs import base  # pylint: disable=g-import-not-at-top
  assert networks.NOISE_MODES is base.NOISE_MODES
  assert augment.parse_policy is base.parse_policy
  assert tuple(augment._OPS) == base.AUGMENTATIONS  # pylint: disable=protected-access




def test_from_file_applies_overrides_as_literals():
  """Scripts (benchmarks) load a config file the way `--config=FILE --config.KEY=VALUE` does."""
  from common import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.from_file(REPO / 'ddpm/configs/anime32.py', [
      '--config.model.block_out_channels=(16, 32)', 'train.batch_size=24',
      'sample.sampler=ddpm', 'diffusion.min_snr_gamma=0.0'])
  assert config.model.block_out_channels == (16, 32)
  assert config.train.batch_size == 24 and config.sample.sampler == 'ddpm'
  assert config.diffusion.min_snr_gamma == 0.0 and config.data.image_size == 32
