"""What a fine-tuning run hands its users, written from its current weights: the method's
file (a PEFT/diffusers LoRA, diffusers' learned_embeds, a hypernetwork, a ControlNetModel
folder) and, for DreamBooth on a pipeline, the whole fine-tuned pipeline folder.

  method             writes to WORKDIR
  lora               lora.safetensors (PEFT keys; diffusers' load_lora_weights)
  textual_inversion  learned_embeds.safetensors (diffusers' load_textual_inversion)
  hypernetwork       hypernetwork.safetensors
  controlnet         controlnet/ (ControlNetModel.from_pretrained)
  dreambooth         the checkpoint; on a pipeline also pipeline/ (from_pretrained)

Only the small subtrees are gathered (every process takes part); process 0 writes, each
file or folder appearing whole (common.atomic).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax

from common import atomic, logs, lora, mesh as mesh_lib
from latent.controlnet import model as controlnet_lib
from latent.finetune import embeddings, hypernetwork
from latent.sd import pipeline as pipeline_lib

PIPELINE = 'pipeline'  # DreamBooth on a pipeline folder: the fine-tuned pipeline.
ARTEFACTS = {'lora': 'lora.safetensors', 'textual_inversion': embeddings.FILENAME,
             'hypernetwork': 'hypernetwork.safetensors', 'controlnet': controlnet_lib.FOLDER}


def write(workdir: Path, config, params, conds, model) -> Path | None:
  """The method's artefact from `params`, and the concept token's row as
  learned_embeds.safetensors whenever the token is new (so the base sampled with the file
  reads the token as the run does). Returns the method's artefact (None: DreamBooth's is
  the run)."""
  method = config.method
  parts = {}
  if method == 'lora':
    parts[method] = lora.split(params)[1]
  elif method == 'hypernetwork':
    parts[method] = params[hypernetwork.KEY]
  elif method == 'controlnet':
    parts[method] = params['controlnet']
  if conds.added_tokens:
    parts['textual_inversion'] = embeddings.added_rows(params)
  parts = jax.tree.map(mesh_lib.gather, parts)
  if jax.process_index() != 0:
    return None
  for kind, part in parts.items():
    path = workdir / ARTEFACTS[kind]
    if kind == 'lora':
      lora.save(path, part)
    elif kind == 'hypernetwork':
      hypernetwork.save(path, part, tuple(config.hypernetwork.multipliers))
    elif kind == 'controlnet':
      atomic.replace_folder(path, lambda folder, part=part: controlnet_lib.save(
          folder, model.controlnet, part, config.conditioning.width))
    else:
      token = config.concept.token
      tok = conds.tokenizer
      row = tok.ids[token] - (tok.vocab_size - conds.added_tokens)
      embeddings.save(path, [token], part[row:row + 1])
    size = sum(f.stat().st_size for f in path.rglob('*')) if path.is_dir() else \
        path.stat().st_size
    logging.info('Wrote %s (%.1f KiB).', path, size / 1024)
  return workdir / ARTEFACTS[method] if method in ARTEFACTS else None


def write_pipeline(workdir: Path, pipe: pipeline_lib.Pipeline, params, encoder) -> Path | None:
  """DreamBooth on a pipeline: `params` ({'unet', 'encoder'}) as a diffusers pipeline folder,
  WORKDIR/pipeline (what diffusers users load), replaced at each finish of the run."""
  params, vae_params = jax.tree.map(mesh_lib.gather, (params, pipe.vae_params))
  if jax.process_index() != 0:
    return None
  pipe = dataclasses.replace(pipe, unet_params=params['unet'], vae_params=vae_params,
                             text_params=params['encoder'], text_encoder=encoder)
  folder = workdir / PIPELINE
  with logs.Timed(f'writing the fine-tuned pipeline to {folder}'):
    atomic.replace_folder(folder, lambda path: pipeline_lib.write(pipe, path))
  return folder
