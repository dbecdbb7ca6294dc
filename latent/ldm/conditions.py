"""From captions and prompts to condition ids, for text or class conditioning.

Text: the tokenizer's ids [N, max_length]. Class: one id [N, 1], the class name
found in the caption (for the anime captions the hair colour: the class name
among the words before "hair"). The vocabulary or class list is saved in the
workdir, so sampling reads exactly what training used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import ml_collections
import numpy as np

from common import errors
from latent.ldm import text as text_lib
from latent.ldm import unet as unet_lib


FILENAME = 'conditioning.json'


def class_of(caption: str, class_names: Sequence[str], scope_word: str = '') -> str | None:
  """The one class name among the caption's words (before `scope_word` if given), else None."""
  words = text_lib.words(caption)
  if scope_word:
    if scope_word not in words:
      return None
    words = words[:words.index(scope_word)]
  found = {w for w in words if w in class_names}
  return found.pop() if len(found) == 1 else None


class Conditions:
  """Host-side conditioning: the tokenizer (text) or the class names (class)."""

  def __init__(self, kind: str, tokenizer: text_lib.Tokenizer | None = None,
               class_names: Sequence[str] = (), scope_word: str = '', added_tokens: int = 0):
    self.kind = kind
    self.tokenizer = tokenizer
    self.class_names = tuple(class_names)
    self.scope_word = scope_word
    self.added_tokens = added_tokens  # The vocabulary's last words, added after training.

  @classmethod
  def from_captions(cls, c: ml_collections.ConfigDict, captions: Sequence[str]) -> 'Conditions':
    if c.kind == 'text':
      return cls('text', text_lib.Tokenizer.from_captions(captions, c.max_length,
                                                          c.min_word_count))
    return cls('class', class_names=c.class_names, scope_word=c.class_scope)

  @property
  def context_length(self) -> int:
    return self.tokenizer.max_length if self.kind == 'text' else 1

  def encoder(self, c: ml_collections.ConfigDict):
    """The Flax context encoder: ids [B, L] -> (context [B, L, width], mask)."""
    if self.kind == 'text':
      return text_lib.TextEncoder(self.tokenizer.vocab_size, self.tokenizer.max_length,
                                  c.width, c.layers, c.heads, added_tokens=self.added_tokens,
                                  name='encoder')
    return unet_lib.ClassEncoder(len(self.class_names), c.width, name='encoder')

  def knows(self, token: str) -> bool:
    return self.kind == 'text' and token in self.tokenizer.ids

  def with_tokens(self, tokens: Sequence[str]) -> 'Conditions':
    """These conditions with `tokens` appended to the vocabulary (textual inversion's
    placeholders); their embedding rows are the encoder's `added_token_embedding`."""
    if self.kind != 'text':
      raise errors.ConfigError('New tokens need a text-conditioned model; this one is '
                               'class-conditioned.')
    for token in tokens:
      if text_lib.words(token) != [token]:
        raise errors.ConfigError(f'Token {token!r} must be one lower-case word (letters, digits).')
      if token in self.tokenizer.ids:
        raise errors.ConfigError(f'Token {token!r} is already in the vocabulary; pick a word '
                                 'the model has never seen (e.g. sks).')
    tok = text_lib.Tokenizer(self.tokenizer.vocab + list(tokens), self.tokenizer.max_length)
    return Conditions('text', tok, added_tokens=self.added_tokens + len(tokens))

  def training_ids(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, keep): class conditioning leaves out captions naming no single class."""
    if self.kind == 'text':
      ids, _ = self.tokenizer.encode(captions, warn=False)
      long = sum(len(text_lib.words(c)) > self.tokenizer.max_length for c in captions)
      if long:
        logging.warning('%d of %d captions are longer than %d words and were truncated.', long,
                        len(captions), self.tokenizer.max_length)
      return ids, np.ones(len(captions), bool)
    labels = [class_of(c, self.class_names, self.scope_word) for c in captions]
    keep = np.array([l is not None for l in labels])
    if not keep.any():
      raise errors.DataError(f'No caption names exactly one of the classes {self.class_names}'
                       f'{" before " + repr(self.scope_word) if self.scope_word else ""}.')
    if not keep.all():
      logging.warning('Class conditioning: %d of %d captions name no single class and are left '
                      'out.', (~keep).sum(), len(captions))
    ids = np.array([self.class_names.index(l) if l else 0 for l in labels], np.int32)[:, None]
    return ids, keep

  def prompt_ids(self, prompts: Sequence[str]) -> np.ndarray:
    """Ids for sampling prompts; warns on truncation and unknown words, raises on unknown classes."""
    if self.kind == 'text':
      for p in prompts:
        unknown = self.tokenizer.unknown_words(p)
        if unknown:
          logging.warning('Prompt %r has words never seen in training (read as <unk>): %s.', p,
                          ', '.join(unknown))
      return self.tokenizer.encode(prompts)[0]
    ids = []
    for p in prompts:
      name = p.strip().lower() if p.strip().lower() in self.class_names else class_of(
          p, self.class_names, self.scope_word)
      if name is None:
        raise errors.ConfigError(f'Unknown class in prompt {p!r}; the classes are: '
                         f'{", ".join(self.class_names)}.')
      ids.append(self.class_names.index(name))
    return np.array(ids, np.int32)[:, None]

  def caption_for(self, prompt: str) -> str:
    """The caption recorded for a prompt: a bare class name gets its scope word ("red" ->
    "red hair"), so captions of class samples read like the data set's."""
    if self.kind == 'class' and self.scope_word and prompt.strip().lower() in self.class_names:
      return f'{prompt.strip().lower()} {self.scope_word}'
    return prompt

  def save(self, workdir: str | Path) -> None:
    d = {'kind': self.kind, 'class_names': list(self.class_names), 'scope_word': self.scope_word}
    if self.tokenizer:
      d.update(vocab=self.tokenizer.vocab, max_length=self.tokenizer.max_length,
               added_tokens=self.added_tokens)
    (Path(workdir) / FILENAME).write_text(json.dumps(d, indent=1))

  @classmethod
  def load(cls, workdir: str | Path) -> 'Conditions':
    path = Path(workdir) / FILENAME
    if not path.is_file():
      raise errors.MissingFileError(f'{path} is missing: {workdir} is not a stage-2 workdir, or its '
                              'training never started.')
    d = json.loads(path.read_text())
    tokenizer = text_lib.Tokenizer(d['vocab'], d['max_length']) if d['kind'] == 'text' else None
    return cls(d['kind'], tokenizer, d['class_names'], d['scope_word'], d.get('added_tokens', 0))
