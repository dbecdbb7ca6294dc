"""A Stable Diffusion pipeline's U-Net and CLIP behind the denoiser interface of stage 2.

`PipelineDenoiser` has `LatentDenoiser`'s methods (encode, null, __call__), so the one
guided sampler (latent.ldm.sampler) samples a pipeline and stage 2's step fine-tunes it;
`ClipConditions` puts the pipeline's CLIP tokenizer behind `Conditions`' interface.
"""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from latent.ldm import conditions as conditions_lib
from latent.ldm.unet import ConditionalUNet, controlled_unet
from latent.sd import clip


class PipelineDenoiser(nn.Module):
  """A pipeline's U-Net and CLIP text encoder behind LatentDenoiser's interface (encode,
  null, __call__), so stage 2's step and guided sampler train and sample it. SD has no
  learned null context: the unconditional context is the empty prompt's encoding."""
  unet: ConditionalUNet
  encoder: clip.CLIPTextModel
  null_ids: tuple[int, ...]
  controlnet: nn.Module | None = None

  def encode(self, ids):
    return self.encoder(ids), jnp.ones(ids.shape, bool)  # SD's U-Net sees every token.

  def null(self, batch_size: int):
    return self.encode(jnp.broadcast_to(jnp.asarray(self.null_ids, jnp.int32),
                                        (batch_size, len(self.null_ids))))

  def __call__(self, z, t, context, mask, train: bool = False, control=None,
               control_scale=1.0, guess_mode: bool = False):
    del mask
    return controlled_unet(self, z, t, context, None, train, control, control_scale, guess_mode)


class ClipConditions:
  """The pipeline's CLIP tokenizer behind `Conditions`' interface. Its BPE reads any word,
  so only textual inversion gives the concept token a row of its own; the other methods
  read it as BPE pieces (DreamBooth's rare-token recipe)."""
  kind = 'clip'

  def __init__(self, tokenizer: clip.Tokenizer, folder: str, added_tokens: int = 0):
    self.tokenizer, self.folder, self.added_tokens = tokenizer, folder, added_tokens

  def knows(self, token: str) -> bool:
    """Whether `token` is an entry of the vocabulary as it stands (added tokens included)."""
    return token in self.tokenizer.tokenizer.get_vocab()

  def with_tokens(self, tokens: list[str]) -> 'ClipConditions':
    return ClipConditions(self.tokenizer.with_tokens(tokens), self.folder,
                          self.added_tokens + len(tokens))

  def prompt_ids(self, prompts):
    return self.tokenizer(list(prompts))[0]

  def training_ids(self, captions):
    return self.prompt_ids(captions), np.ones(len(captions), bool)

  def caption_for(self, prompt: str) -> str:
    return prompt

  def save(self, workdir):
    (Path(workdir) / conditions_lib.FILENAME).write_text(
        json.dumps({'kind': self.kind, 'pipeline': str(self.folder)}))
