"""Every command through its real command line: one-line errors, exit status 2, run records kept.

Each case runs `python -m PACKAGE.main ...` (or `python -m metrics ...`) in a
subprocess, as a user would, and checks what the user sees: one `error: ...`
line naming the problem, no traceback, exit status 2, and an existing run's
config.json and checkpoints untouched.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import errors, loop
from ddpm.configs import demo as ddpm_demo
from latent.configs import vae_demo

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, **(env or {})))


def _one_line_error(proc: subprocess.CompletedProcess, status: int = 2) -> str:
  """The single `error:` line of a failed command; fails on tracebacks or extra errors."""
  out = proc.stdout + proc.stderr
  for noise in ('Traceback', 'oneDNN', 'absl::InitializeLog', 'Unable to initialize backend'):
    assert noise not in out, out
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1, out
  assert proc.returncode == status, (proc.returncode, out)
  return lines[0]


def _fake_run(workdir: Path, config) -> bytes:
  """A workdir as a finished run leaves it: config.json and a checkpoint step folder."""
  loop.record_config(config, workdir)
  (workdir / 'checkpoints' / '100').mkdir(parents=True)
  (workdir / 'checkpoints' / '100' / 'state').write_bytes(b'not to be touched')
  return (workdir / 'config.json').read_bytes()


def _assert_untouched(workdir: Path, record: bytes) -> None:
  assert (workdir / 'config.json').read_bytes() == record
  assert (workdir / 'checkpoints' / '100' / 'state').read_bytes() == b'not to be touched'
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['100']


DDPM = ('ddpm.main', '--config=ddpm/configs/demo.py')


def test_mistyped_key_names_the_key_and_a_suggestion(tmp_path):
  line = _one_line_error(_run(*DDPM, f'--workdir={tmp_path}', '--config.train.num_stepz=5'))
  assert line == 'error: unknown config key train.num_stepz (did you mean train.num_steps?)'
  assert not tmp_path.joinpath('config.json').exists()


def test_bad_value_and_bad_choice_are_one_line(tmp_path):
  line = _one_line_error(_run(*DDPM, f'--workdir={tmp_path}', '--config.sample.sampler=ddimm'))
  assert "sample.sampler='ddimm'" in line and 'ddim' in line
  line = _one_line_error(_run(*DDPM, f'--workdir={tmp_path}', '--config.train.num_steps=many'))
  assert 'train.num_steps' in line


def test_failed_run_leaves_the_existing_record_alone(tmp_path):
  """A missing data folder fails before anything is written over a trained workdir."""
  record = _fake_run(tmp_path, ddpm_demo.get_config())
  line = _one_line_error(_run(*DDPM, f'--workdir={tmp_path}', '--config.data.source=folder',
                              '--config.data.path=/nope'))
  assert line == 'error: Image folder /nope does not exist.'
  _assert_untouched(tmp_path, record)


def test_resuming_with_another_architecture_names_the_keys(tmp_path):
  record = _fake_run(tmp_path, ddpm_demo.get_config())
  line = _one_line_error(_run(*DDPM, f'--workdir={tmp_path}',
                              '--config.model.block_out_channels=(16,32)',
                              '--config.diffusion.prediction=v'))
  assert 'model.block_out_channels' in line and 'diffusion.prediction' in line
  assert 'new --workdir' in line
  _assert_untouched(tmp_path, record)


def test_vae_rerun_with_other_model_keeps_stage_one_record(tmp_path):
  """Stage 2 rebuilds the VAE from this config.json: a failed rerun must not rewrite it."""
  record = _fake_run(tmp_path, vae_demo.get_config())
  line = _one_line_error(_run('latent.main', '--config=latent/configs/vae_demo.py',
                              f'--workdir={tmp_path}', '--config.vae.latent_channels=8'))
  assert 'vae.latent_channels' in line
  _assert_untouched(tmp_path, record)


def test_check_workdir_allows_and_logs_harmless_changes(tmp_path, caplog):
  config = ddpm_demo.get_config()
  _fake_run(tmp_path, config)
  config.train.num_steps *= 2
  config.train.log_every = 7
  with caplog.at_level(logging.INFO):
    loop.check_workdir(config, tmp_path, ('model', 'diffusion.prediction'))
  assert 'train.num_steps' in caplog.text and 'train.log_every' in caplog.text
  config.model.norm_groups = 4
  with pytest.raises(errors.WorkdirError, match='model.norm_groups 8 -> 4'):
    loop.check_workdir(config, tmp_path, ('model',))
  # No checkpoint yet: nothing to protect, any change is fine.
  loop.check_workdir(config, tmp_path / 'fresh', ('model',))


def test_sampling_without_a_checkpoint(tmp_path):
  for command in (DDPM, ('stylegan.main', '--config=stylegan/configs/demo.py')):
    line = _one_line_error(_run(*command, f'--workdir={tmp_path}', '--mode=sample'))
    assert line.startswith(f'error: No checkpoint in {tmp_path}') and 'train first' in line


def test_mixed_sizes_name_the_key(tmp_path):
  folder = tmp_path / 'mixed'
  folder.mkdir()
  Image.new('RGB', (16, 16)).save(folder / 'a.png')
  Image.new('RGB', (20, 20)).save(folder / 'b.png')
  line = _one_line_error(_run(*DDPM, f'--workdir={tmp_path / "run"}', '--config.data.source=folder',
                              f'--config.data.path={folder}', '--config.data.resize=False'))
  assert 'different sizes' in line and '--config.data.resize=True' in line
  assert not (tmp_path / 'run').exists()


def test_unknown_stylegan_and_latent_keys(tmp_path):
  line = _one_line_error(_run('stylegan.main', '--config=stylegan/configs/demo.py',
                              f'--workdir={tmp_path}', '--config.loss.r1_gama=1'))
  assert line == 'error: unknown config key loss.r1_gama (did you mean loss.r1_gamma?)'
  line = _one_line_error(_run('latent.main', '--config=latent/configs/ldm_demo.py',
                              f'--workdir={tmp_path}', '--config.vae_workdir=/no/vae'))
  assert '/no/vae' in line and 'stage 1' in line


def test_debug_flag_shows_the_traceback(tmp_path):
  proc = _run(*DDPM, f'--workdir={tmp_path}', '--config.data.source=folder',
              '--config.data.path=/nope', '--debug')
  assert proc.returncode != 0 and 'Traceback' in proc.stderr


# ---------------------------------------------------------------------------
# metrics.


@pytest.fixture(scope='module')
def three_images(tmp_path_factory):
  folder = tmp_path_factory.mktemp('three')
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f'{i}.png')
  return folder


def test_afd_progress_reaches_the_end_and_quiet_goes_anywhere(three_images):
  proc = _run('metrics', 'afd', str(three_images))
  assert proc.returncode == 0, proc.stderr
  assert '3/3' in proc.stderr  # The bar's last tick (it stopped one short before).
  quiet = _run('metrics', 'afd', str(three_images), '-q')
  assert quiet.returncode == 0, quiet.stderr
  assert 'AFD: 0.0000 (0/3' in quiet.stdout and 'img/s' not in quiet.stderr


def test_hw6_without_inception_weights_reports_afd(three_images, tmp_path):
  proc = _run('metrics', 'hw6', str(three_images), str(three_images), '-q',
              env={'FID_INCEPTION_WEIGHTS': str(tmp_path / 'missing.pth')})
  assert proc.returncode == 1, proc.stderr
  assert 'FID: skipped  AFD: 0.0000 (0/3' in proc.stdout
  assert proc.stderr.startswith('error: FID skipped: FID Inception weights not found')
  assert 'Traceback' not in proc.stderr
