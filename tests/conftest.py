"""Shared test setup: torch-side peers importable on CPU, and the ../shared data folder."""

from pathlib import Path

import pytest

from common.torch_compat import patch_torchvision

patch_torchvision()

# ../shared beside the checkout holds real data; a user's fresh clone has none.
SHARED = Path(__file__).resolve().parents[1].parent / 'shared'


def shared_path(*parts: str) -> Path:
  """Path under ../shared, skipping the calling test if that data is absent."""
  p = SHARED.joinpath(*parts)
  if not p.exists():
    pytest.skip(f'needs {p} (the ../shared data folder beside the checkout is absent)')
  return p
