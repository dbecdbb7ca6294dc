"""Textual-inversion embeddings (Gal et al. 2022): new tokens for a trained text encoder
(ours, latent.ldm.text, or a pipeline's CLIP, latent.sd.clip).

A placeholder token ("sks") is appended to the vocabulary (`Conditions.with_tokens`)
and its embedding row is the text encoder's `added_token_embedding` parameter, the
only thing textual inversion trains. Files use diffusers' `learned_embeds.safetensors`
layout: one tensor per token, named by the token, of shape [num_vectors, width] (here
num_vectors is 1: the word tokenizer gives a token one id).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import jax.numpy as jnp
import numpy as np

from common import atomic, errors
from latent.ldm import conditions as conditions_lib

FILENAME = 'learned_embeds.safetensors'
PARAM = 'added_token_embedding'


def token_table(params):
  """The text encoder's trained token table [vocab, width]: ours (text.TextEncoder) or CLIP's."""
  enc = params['encoder']
  return (enc['token_embedding'] if 'token_embedding' in enc
          else enc['embeddings.token_embedding'])['embedding']


def added_rows(params) -> np.ndarray | None:
  """The added tokens' rows [n, width] of a text LDM's parameters (None if it has none)."""
  return params['encoder'].get(PARAM)


def with_rows(params, rows) -> dict:
  """`params` with `rows` [n, width] appended to the added tokens' rows."""
  enc = params['encoder']
  old = enc.get(PARAM)
  new = jnp.asarray(rows, jnp.float32) if old is None else jnp.concatenate([old, rows])
  return {**params, 'encoder': {**enc, PARAM: new}}


def save(path: str | Path, tokens: list[str], rows) -> Path:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  rows = np.asarray(rows, np.float32)
  tensors = {t: np.ascontiguousarray(rows[i:i + 1]) for i, t in enumerate(tokens)}
  return atomic.write_file(path, lambda tmp: save_file(tensors, str(tmp)))


def load(path: str | Path, width: int) -> dict[str, np.ndarray]:
  """{token: [1, width]} from a learned_embeds.safetensors file, checked against `width`."""
  path = Path(path)
  if not path.is_file():
    raise errors.MissingFileError(f'Embedding file {path} does not exist.')
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    tensors = load_file(str(path))
  except Exception as e:  # safetensors raises its own error types for bad files.
    raise errors.DataError(f'{path} is not a safetensors embedding file: {e}') from None
  if not tensors:
    raise errors.DataError(f'{path} holds no embedding.')
  out = {}
  for token, v in tensors.items():
    v = np.asarray(v, np.float32)
    if v.ndim == 1:
      v = v[None]
    if v.shape != (1, width):
      raise errors.ConfigError(f'{path}: the embedding of {token!r} has shape {v.shape}; this '
                               f'model takes one vector of width {width} per token.')
    out[token] = v
  return out


def apply_files(params, conds: conditions_lib.Conditions, paths: Iterable[str]):
  """(params, conditions) with the tokens of the embedding files added (sample.embeddings)."""
  paths = list(paths)
  if not paths:
    return params, conds
  width = token_table(params).shape[1]
  tokens, rows = [], []
  for path in paths:
    for token, v in load(path, width).items():
      tokens.append(token)
      rows.append(v)
  return with_rows(params, np.concatenate(rows)), conds.with_tokens(tokens)
