"""Text conditioning: a word tokenizer built from the training captions and a small
Transformer encoder trained jointly with the U-Net (the LDM paper's text-to-image
setting, Rombach et al. 2022, sec. 4.3).

The encoder is its own module with its own token table, so later work can add
tokens (textual inversion) or put a pretrained CLIP text encoder in its place:
anything mapping token ids [B, L] to a context [B, L, D] with a mask fits.
"""

from __future__ import annotations

import collections
import json
import logging
import re
from pathlib import Path
from typing import Iterable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from common.layers import dense
from latent.ldm import attention

PAD, UNK = '<pad>', '<unk>'
_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
  """Lower-cased words; punctuation separates words and is dropped."""
  return _WORD.findall(text.lower())


class Tokenizer:
  """Word-level tokenizer: id 0 pads, id 1 is every word not in the vocabulary."""

  def __init__(self, vocab: Sequence[str], max_length: int):
    if max_length < 1:
      raise ValueError(f'max_length must be >= 1, got {max_length}.')
    vocab = list(vocab)
    if vocab[:2] != [PAD, UNK]:
      raise ValueError(f'A vocabulary starts with {PAD!r}, {UNK!r}; got {vocab[:2]}.')
    self.vocab = vocab
    self.max_length = max_length
    self.ids = {w: i for i, w in enumerate(vocab)}

  @classmethod
  def from_captions(cls, captions: Iterable[str], max_length: int,
                    min_count: int = 1) -> 'Tokenizer':
    """Vocabulary: the words seen at least `min_count` times, most frequent first."""
    counts = collections.Counter(w for c in captions for w in words(c))
    kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return cls([PAD, UNK] + kept, max_length)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def word_id(self, word: str) -> int | None:
    return self.ids.get(word)

  def unknown_words(self, text: str) -> list[str]:
    return [w for w in words(text) if w not in self.ids]

  def encode(self, texts: Sequence[str], warn: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [N, max_length] int32 (padded with 0) and mask [N, max_length] (True = token).

    A text longer than max_length is truncated, with a warning naming it.
    """
    if isinstance(texts, str):
      texts = [texts]
    ids = np.zeros((len(texts), self.max_length), np.int32)
    for n, text in enumerate(texts):
      tokens = [self.ids.get(w, 1) for w in words(text)]
      if not tokens:
        tokens = [1]  # An empty caption still needs one key to attend to.
      if len(tokens) > self.max_length and warn:
        logging.warning('Prompt %r has %d words; truncated to the maximum length %d.', text,
                        len(tokens), self.max_length)
      tokens = tokens[:self.max_length]
      ids[n, :len(tokens)] = tokens
    return ids, ids != 0

  def decode(self, ids: Sequence[int]) -> str:
    return ' '.join(self.vocab[int(i)] for i in ids if int(i) != 0)

  def save(self, path: str | Path) -> None:
    Path(path).write_text(json.dumps({'max_length': self.max_length, 'vocab': self.vocab}))

  @classmethod
  def load(cls, path: str | Path) -> 'Tokenizer':
    d = json.loads(Path(path).read_text())
    return cls(d['vocab'], d['max_length'])


class EncoderLayer(nn.Module):
  """Pre-LayerNorm Transformer layer: x + attn(LN(x)), then x + MLP(LN(x))."""
  heads: int
  mlp_ratio: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    width = x.shape[-1]
    h = nn.LayerNorm(dtype=self.dtype, name='layer_norm1')(x)
    x = x + attention.Attention(self.heads, width // self.heads, dtype=self.dtype,
                                name='self_attn')(h, mask=mask)
    h = nn.LayerNorm(dtype=self.dtype, name='layer_norm2')(x)
    h = dense(h, self.mlp_ratio * width, dtype=self.dtype, name='mlp.fc1')
    return x + dense(nn.gelu(h), width, dtype=self.dtype, name='mlp.fc2')


class TextEncoder(nn.Module):
  """Token ids [B, L] -> context [B, L, width]: embeddings + positions, Transformer, LayerNorm.

  Attention never looks at padding (the mask), so a caption encodes the same
  whatever the padded length. Tokens added after training (`added_tokens`, the last
  ids of the vocabulary: textual inversion's placeholders) have their rows in a
  parameter of their own, `added_token_embedding`, so fine-tuning can train those rows
  alone and the trained table stays bit-identical.
  """
  vocab_size: int
  max_length: int
  width: int = 256
  layers: int = 2
  heads: int = 4
  dtype: jnp.dtype = jnp.float32
  added_tokens: int = 0

  @nn.compact
  def __call__(self, ids, mask=None):
    if mask is None:
      mask = ids != 0
    embed = nn.Embed(self.vocab_size - self.added_tokens, self.width, name='token_embedding')
    if self.added_tokens:
      added = self.param('added_token_embedding', nn.initializers.normal(1.0),
                         (self.added_tokens, self.width))
      x = jnp.take(jnp.concatenate([embed.embedding, added]), ids, axis=0)
    else:
      x = embed(ids)
    pos = self.param('position_embedding', nn.initializers.normal(0.01),
                     (self.max_length, self.width))
    x = (x + pos[None, :ids.shape[1]]).astype(self.dtype)
    for i in range(self.layers):
      x = EncoderLayer(self.heads, dtype=self.dtype, name=f'layers_{i}')(x, mask)
    return nn.LayerNorm(dtype=self.dtype, name='final_layer_norm')(x), mask
