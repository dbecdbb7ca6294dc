"""Files and folders that appear whole or not at all: written beside their final name, then
renamed (a rename within a folder is atomic), so a run killed at any moment leaves the old
version or the new one, never half of either."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def write_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
  """write(tmp) for a temporary name beside `path` (same suffix, so writers that pick a
  format by suffix still do), then put it in place of `path`."""
  path = Path(path)
  tmp = path.with_name(f'{path.stem}.tmp{path.suffix}')
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


def new_folder(folder: str | os.PathLike, write: Callable[[Path], object]) -> Path:
  """write(FOLDER.tmp) then rename it to `folder`, which must not exist (a stale FOLDER.tmp
  of a killed write is removed first)."""
  folder = Path(folder)
  tmp = folder.with_name(folder.name + '.tmp')
  if tmp.exists():
    shutil.rmtree(tmp)
  write(tmp)
  tmp.rename(folder)
  return folder


def replace_folder(folder: str | os.PathLike, write: Callable[[Path], object]) -> Path:
  """write(path) then put it in place of `folder`, never leaving no whole copy: the new one
  is written as FOLDER.tmp, the old one kept as FOLDER.old until the new one is in place
  (a run killed in between leaves FOLDER.old, which the next call restores first)."""
  folder = Path(folder)
  tmp, old = (folder.with_name(folder.name + suffix) for suffix in ('.tmp', '.old'))
  if old.exists() and not folder.exists():
    old.rename(folder)  # Killed between the two renames below.
  for stale in (tmp, old):
    if stale.exists():
      shutil.rmtree(stale)
  write(tmp)
  if folder.exists():
    folder.rename(old)
  tmp.rename(folder)
  if old.exists():
    shutil.rmtree(old)
  return folder
