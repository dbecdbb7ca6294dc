"""CLIP's text encoder in Flax, layer for layer transformers' CLIPTextModel (Stable Diffusion's).

Token + learned position embeddings, a causal pre-LayerNorm Transformer (quick-GELU
or GELU MLPs as the config says), a final LayerNorm. Module names follow the
PyTorch state-dict keys (`encoder.layers.0.self_attn.q_proj` is
`encoder/layers_0/self_attn/q_proj`), so `ddpm.convert` moves the weights.

`load(folder)` reads a Stable Diffusion pipeline's `text_encoder/` folder (config.json +
model.safetensors, with safetensors' numpy API: no torch), and `Tokenizer(folder)` its
`tokenizer/` folder through transformers' CLIP tokenizer (pads and truncates to
max_length, as the pipelines do).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import errors
from ddpm import convert
from common.layers import dense, dot_product_attention, gelu

ACTIVATIONS = {
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),       # OpenAI CLIP (SD 1.x).
    'gelu': gelu,                                                  # OpenCLIP (SD 2.x).
}


class Attention(nn.Module):
  """Multi-head self-attention with a causal mask (and an optional padding mask)."""
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    b, n, d = x.shape
    head_dim = d // self.heads
    proj = lambda name: dense(x, d, dtype=self.dtype, name=name).reshape(b, n, self.heads,
                                                                         head_dim)
    out = dot_product_attention(proj('q_proj'), proj('k_proj'), proj('v_proj'), mask)
    return dense(out.reshape(b, n, d), d, dtype=self.dtype, name='out_proj')


class EncoderLayer(nn.Module):
  """One encoder layer with PyTorch's module names (self_attn, layer_norm1/2, mlp.fc1/fc2)."""
  heads: int
  intermediate_size: int
  activation: str
  eps: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    ln = lambda name: nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name=name)
    x = x + Attention(self.heads, self.dtype, name='self_attn')(ln('layer_norm1')(x), mask)
    h = ln('layer_norm2')(x)
    h = dense(h, self.intermediate_size, dtype=self.dtype, name='mlp.fc1')
    h = dense(ACTIVATIONS[self.activation](h), x.shape[-1], dtype=self.dtype, name='mlp.fc2')
    return x + h


class CLIPTextModel(nn.Module):
  """transformers' CLIPTextModel: ids [B, L] -> the last layer's hidden states after the final
  LayerNorm [B, L, D]. `clip_skip=1` takes the penultimate layer's instead (still through
  the final LayerNorm, as diffusers' `clip_skip` and SD 2.x-style conditioning do);
  `return_hidden_states` also returns every layer's raw output (embeddings first)."""
  vocab_size: int
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  heads: int = 12
  max_positions: int = 77
  activation: str = 'quick_gelu'
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  added_tokens: int = 0  # Textual inversion's rows (ids vocab_size ...), a parameter apart.

  @nn.compact
  def __call__(self, ids, attention_mask=None, clip_skip: int = 0,
               return_hidden_states: bool = False):
    b, n = ids.shape
    embed = nn.Embed(self.vocab_size, self.hidden_size, name='embeddings.token_embedding')
    if self.added_tokens:
      added = self.param('added_token_embedding', nn.initializers.normal(0.02),
                         (self.added_tokens, self.hidden_size))
      x = jnp.take(jnp.concatenate([embed.embedding, added.astype(embed.embedding.dtype)]), ids,
                   axis=0)
    else:
      x = embed(ids)
    pos = self.param('embeddings.position_embedding',
                     nn.initializers.normal(0.02), (self.max_positions, self.hidden_size))
    x = (x + pos[None, :n]).astype(self.dtype)
    mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
    if attention_mask is not None:  # Padding keys are never attended to.
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    hidden = [x]
    for i in range(self.num_layers):
      x = EncoderLayer(self.heads, self.intermediate_size, self.activation, self.eps,
                       self.dtype, name=f'encoder.layers_{i}')(x, mask)
      hidden.append(x)
    out = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype,
                       name='final_layer_norm')(hidden[-1 - clip_skip]).astype(jnp.float32)
    if return_hidden_states:
      return out, [h.astype(jnp.float32) for h in hidden]
    return out


def from_config(cfg: dict, dtype=jnp.float32) -> CLIPTextModel:
  """Our module for a transformers CLIPTextConfig (text_encoder/config.json)."""
  act = cfg.get('hidden_act', 'quick_gelu')
  if act not in ACTIVATIONS:
    raise errors.ConfigError(f'CLIP hidden_act={act!r} is not one of {", ".join(ACTIVATIONS)}.')
  return CLIPTextModel(vocab_size=cfg['vocab_size'], hidden_size=cfg['hidden_size'],
                       intermediate_size=cfg['intermediate_size'],
                       num_layers=cfg['num_hidden_layers'], heads=cfg['num_attention_heads'],
                       max_positions=cfg['max_position_embeddings'], activation=act,
                       eps=cfg.get('layer_norm_eps', 1e-5), dtype=dtype)


def params_from_state_dict(state: dict[str, np.ndarray], model: CLIPTextModel) -> dict:
  """A CLIPTextModel state dict (numpy; with or without the 'text_model.' prefix) -> params."""
  state = {k.removeprefix('text_model.'): v for k, v in state.items()
           if not k.endswith('position_ids')}  # A buffer, not a weight.
  # Our position table is a bare parameter: give it the name the converter maps to 'weight'.
  ids = jnp.zeros((1, model.max_positions), jnp.int32)
  reference = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)['params']
  flat_ref = dict(reference)
  pos = flat_ref.pop('embeddings.position_embedding')
  positions = np.asarray(state.pop('embeddings.position_embedding.weight'), np.float32)
  if positions.shape != pos.shape:
    raise errors.ConfigError(f'position_embedding is {positions.shape}, the config says {pos.shape}.')
  params = convert.params_from_torch_state_dict(state, flat_ref)
  params['embeddings.position_embedding'] = positions
  return params


def load(folder: str | Path, dtype=jnp.float32) -> tuple[CLIPTextModel, dict]:
  """(model, params) of a pipeline's text_encoder/ folder (config.json + model.safetensors)."""
  folder = Path(folder)
  hint = ('expected a CLIPTextModel folder written by save_pretrained() (a Stable Diffusion '
          'pipeline\'s text_encoder/). Download the pipeline on a machine with network access, '
          'e.g. huggingface-cli download <repo> --include "text_encoder/*" "tokenizer/*".')
  if not (folder / 'config.json').is_file():
    raise errors.MissingFileError(f'{folder / "config.json"} not found: {hint}')
  model = from_config(json.loads((folder / 'config.json').read_text()), dtype)
  return model, params_from_state_dict(convert.read_safetensors(folder, 'model', hint), model)


def save(folder: str | Path, model: CLIPTextModel, params, config: dict) -> Path:
  """A text_encoder/ folder transformers' CLIPTextModel.from_pretrained opens: `config` (the
  loaded config.json) and model.safetensors; added tokens' rows join the table."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  params = dict(params)
  positions = np.asarray(params.pop('embeddings.position_embedding'), np.float32)
  added = params.pop('added_token_embedding', None)
  if added is not None:
    table = params['embeddings.token_embedding']['embedding']
    params['embeddings.token_embedding'] = {'embedding': jnp.concatenate(
        [table, jnp.asarray(added, table.dtype)])}
  state = {f'text_model.{k}': v for k, v in convert.params_to_torch_state_dict(params).items()}
  state['text_model.embeddings.position_embedding.weight'] = positions
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  record = dict(config, vocab_size=model.vocab_size + model.added_tokens)
  (folder / 'config.json').write_text(json.dumps(record, indent=2) + '\n')
  save_file(state, str(folder / 'model.safetensors'), metadata={'format': 'pt'})
  return folder


class Tokenizer:
  """A pipeline's tokenizer/ folder through transformers' CLIP tokenizer: prompts -> ids
  [B, max_length] (start, tokens, end, padding; longer prompts truncated) and the mask."""

  def __init__(self, folder: str | Path, max_length: int | None = None,
               table_size: int | None = None):
    folder = Path(folder)
    if not any((folder / f).is_file() for f in ('vocab.json', 'tokenizer.json')):
      raise errors.MissingFileError(f'{folder / "vocab.json"} not found: expected a CLIP '
                                    'tokenizer folder (vocab.json + merges.txt, or '
                                    'tokenizer.json).')
    import transformers  # pylint: disable=g-import-not-at-top
    self.tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder))
    self.max_length = max_length or self.tokenizer.model_max_length
    # Tokens added later (textual inversion) get the ids after the text encoder's table
    # (`table_size` rows, which may exceed the tokenizer's vocabulary), where
    # CLIPTextModel(added_tokens=...) keeps their rows.
    self.base_size = len(self.tokenizer)
    self.table_size = table_size or self.base_size

  def _our_id(self, i):
    return np.where(i >= self.base_size, i - self.base_size + self.table_size, i)

  @property
  def ids(self) -> dict[str, int]:
    """Every token's id (BPE pieces end in '</w>'; added tokens are whole words)."""
    vocab = self.tokenizer.get_vocab()
    return dict(zip(vocab, self._our_id(np.fromiter(vocab.values(), int)).tolist()))

  @property
  def vocab_size(self) -> int:
    """Rows the text encoder needs: its table and the added tokens'."""
    return self.table_size + len(self.tokenizer) - self.base_size

  def with_tokens(self, tokens: list[str]) -> 'Tokenizer':
    """A copy that reads each of `tokens` as one new id after the table (as diffusers'
    load_textual_inversion adds them)."""
    known = [t for t in tokens if t in self.tokenizer.get_vocab()]
    if known:
      raise errors.ConfigError(f'Token {known[0]!r} is already in the CLIP vocabulary; pick a '
                               'new placeholder (e.g. <my-concept>).')
    for t in tokens:
      if self.word_id(t) is not None:
        logging.warning('%r is a word CLIP reads as one token; as a new token it stands for the '
                        'learned concept in every prompt (as with diffusers\' '
                        'load_textual_inversion).', t)
    if len(set(tokens)) < len(tokens):
      raise errors.ConfigError(f'Tokens {list(tokens)}: the same token twice (two embedding '
                               'files for one token?).')
    new = copy.copy(self)
    new.tokenizer = copy.deepcopy(self.tokenizer)
    new.tokenizer.add_tokens(list(tokens))
    return new

  def word_id(self, word: str) -> int | None:
    """The id of `word` if the tokenizer reads it as a single token, else None."""
    ids = self.tokenizer.encode(word, add_special_tokens=False)
    return int(self._our_id(ids[0])) if len(ids) == 1 else None

  def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    out = self.tokenizer(list(prompts), padding='max_length', truncation=True,
                         max_length=self.max_length, return_tensors='np')
    return self._our_id(out['input_ids']).astype(np.int32), out['attention_mask'].astype(bool)
