"""Shared test setup: torch-side peers importable on CPU, and the ../shared data folder."""

import os
from pathlib import Path

import jax
import pytest

from common.torch_compat import patch_torchvision

patch_torchvision()

# Many tests (and their subprocesses, which inherit the variables) compile the same tiny
# programs: a persistent compilation cache compiles each once.
_CACHE = Path(__file__).resolve().parents[1] / '.pytest_cache' / 'jax_compilation_cache'
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(_CACHE))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

# ../shared beside the checkout holds real data; a user's fresh clone has none.
SHARED = Path(__file__).resolve().parents[1].parent / 'shared'


def shared_path(*parts: str) -> Path:
  """Path under ../shared, skipping the calling test if that data is absent."""
  p = SHARED.joinpath(*parts)
  if not p.exists():
    pytest.skip(f'needs {p} (the ../shared data folder beside the checkout is absent)')
  return p
