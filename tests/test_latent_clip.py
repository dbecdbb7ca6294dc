"""The Flax CLIP text encoder against transformers' CLIPTextModel, and the CLIP tokenizer folder."""

import json

import numpy as np
import pytest
import torch

from common import errors
from latent.sd import clip


def tiny_text_encoder(folder, act):
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.CLIPTextConfig(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
      num_attention_heads=4, max_position_embeddings=16, hidden_act=act, bos_token_id=0,
      eos_token_id=1, pad_token_id=1)
  torch.manual_seed(0)
  model = transformers.CLIPTextModel(config).eval()
  with torch.no_grad():  # Non-trivial LayerNorms and biases too.
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model


@pytest.mark.parametrize('act', ['quick_gelu', 'gelu'])
def test_matches_transformers_clip_text_model(tmp_path, act):
  reference = tiny_text_encoder(tmp_path / 'text_encoder', act)
  model, params = clip.load(tmp_path / 'text_encoder')
  ids = np.array([[0, 5, 9, 33, 1, 1, 1, 1], [0, 7, 2, 61, 12, 40, 3, 1]], np.int32)
  with torch.no_grad():
    want = reference(torch.from_numpy(ids).long(), output_hidden_states=True)
  last, hidden = model.apply({'params': params}, ids, return_hidden_states=True)
  scale = float(want.last_hidden_state.abs().max())
  np.testing.assert_allclose(last, want.last_hidden_state.numpy(), rtol=1e-5, atol=1e-5 * scale)
  penultimate = want.hidden_states[-2].numpy()
  np.testing.assert_allclose(hidden[-2], penultimate, rtol=1e-5,
                             atol=1e-5 * np.abs(penultimate).max())
  # clip_skip=1: the penultimate layer through the final LayerNorm (diffusers' clip_skip).
  with torch.no_grad():
    skipped = reference.text_model.final_layer_norm(want.hidden_states[-2]) if hasattr(
        reference, 'text_model') else reference.final_layer_norm(want.hidden_states[-2])
  np.testing.assert_allclose(model.apply({'params': params}, ids, clip_skip=1), skipped.numpy(),
                             rtol=1e-5, atol=1e-5 * scale)
  # A padding mask: transformers' attention_mask, same outputs.
  mask = (np.arange(8)[None] < np.array([[5], [8]])).astype(np.int32)
  with torch.no_grad():
    masked = reference(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
  np.testing.assert_allclose(model.apply({'params': params}, ids, mask)[:, :5],
                             masked.last_hidden_state.numpy()[:, :5], rtol=1e-5, atol=1e-5 * scale)


def test_missing_text_encoder_folder_names_the_file(tmp_path):
  with pytest.raises(errors.MissingFileError, match='config.json not found'):
    clip.load(tmp_path / 'text_encoder')


def tiny_tokenizer(folder):
  """A CLIP BPE tokenizer folder with a 60-token vocabulary (letters, a few merges)."""
  import transformers  # pylint: disable=g-import-not-at-top
  letters = 'abcdefghijklmnopqrstuvwxyz'
  vocab = ['<|startoftext|>', '<|endoftext|>'] + list(letters) + [c + '</w>' for c in letters]
  merges = [('r', 'e'), ('re', 'd</w>'), ('h', 'a'), ('ha', 'i'), ('hai', 'r</w>')]
  vocab += ['re', 'red</w>', 'ha', 'hai', 'hair</w>']
  folder.mkdir(parents=True)
  (folder / 'vocab.json').write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (folder / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(' '.join(m) for m in merges))
  transformers.CLIPTokenizer(str(folder / 'vocab.json'), str(folder / 'merges.txt'),
                             model_max_length=77).save_pretrained(folder)


def test_tokenizer_pads_and_truncates_as_clip_does(tmp_path):
  tiny_tokenizer(tmp_path / 'tokenizer')
  tok = clip.Tokenizer(tmp_path / 'tokenizer', max_length=8)
  ids, mask = tok(['red hair', 'red hair red hair red hair red hair'])
  assert ids.shape == (2, 8) and ids.dtype == np.int32
  start, end = 0, 1
  red, hair = tok.tokenizer.convert_tokens_to_ids(['red</w>', 'hair</w>'])
  assert ids[0].tolist() == [start, red, hair, end, end, end, end, end]  # Padded with <|endoftext|>.
  assert mask[0].tolist() == [True] * 4 + [False] * 4
  assert ids[1].tolist() == [start, red, hair, red, hair, red, hair, end]  # Truncated, still ends.
  assert mask[1].all()
  assert clip.Tokenizer(tmp_path / 'tokenizer').max_length == 77  # The folder's own length.
