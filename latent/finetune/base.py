"""What a fine-tuning run starts from: a trained text LDM's workdir or a Stable Diffusion
pipeline folder, its config merged into the run's, its EMA weights, and the concept token
added to its vocabulary."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ml_collections
import numpy as np

from common import errors, experiment, mesh as mesh_lib
from latent.configs import finetune_base, ldm_base
from latent.finetune import embeddings
from latent.ldm import conditions as conditions_lib
from latent.ldm import train
from latent.sd import config as sd_config
from latent.vae.codec import Codec


def read_base_config(base_workdir: str | Path) -> ml_collections.ConfigDict:
  """The base run's config.json, checked to be a text-conditioned stage-2 run."""
  path = Path(base_workdir) / 'config.json'
  if not path.is_file():
    raise errors.MissingFileError(f'base_workdir {base_workdir} has no config.json: it is not a '
                                  'trained run (train a text LDM with latent/configs/ldm_*.py).')
  base = json.loads(path.read_text())
  kind = base.get('conditioning', {}).get('kind')
  if base.get('stage') != 'ldm' or kind != 'text':
    raise errors.ConfigError(f'base_workdir {base_workdir} is not a text LDM (its stage is '
                             f'{base.get("stage")!r}, conditioning {kind!r}); fine-tuning needs '
                             "a stage-2 run with conditioning.kind='text'.")
  config = ldm_base.get_config()  # Keys added since the base was trained keep their defaults.
  _merge(config, base)
  return config


def _merge(config: ml_collections.ConfigDict, values: dict) -> None:
  with config.unlocked():
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
        _merge(config[key], value)
      else:
        config[key] = value


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills `config` in place with the base's architecture (finetune_base.FROM_BASE,
  data.image_size); returns the base config."""
  base = read_base_config(config.base_workdir)
  with config.unlocked():
    for key in finetune_base.FROM_BASE:
      config[key] = base[key]
  config.data.image_size = base.data.image_size
  return base


def restore_base(base_config, base_workdir, stage1: Codec, mesh):
  """(EMA parameters, conditions) of the base run."""
  exp = train.Experiment(base_config)
  exp.stage1, exp.mesh = stage1, mesh
  exp.conds = conditions_lib.Conditions.load(base_workdir)
  state = experiment.restore_for_sampling(exp, base_workdir, 'train the base text LDM first.')
  logging.info('Fine-tuning the base at step %d.', int(state.step))
  return exp.rules.of_state(state), exp.conds


def concept_conditions(config, base_conds: conditions_lib.Conditions, base_params):
  """(conditions, params) with concept.token in the vocabulary: added (its row the init
  word's, else random at the table's scale) unless the base knows it already."""
  c = config.concept
  if base_conds.knows(c.token):
    if config.method == 'textual_inversion':
      raise errors.ConfigError(f'concept.token={c.token!r} is already in the base\'s vocabulary; '
                               'textual inversion needs a new word (e.g. sks).')
    return base_conds, base_params
  if base_conds.kind == 'clip' and config.method != 'textual_inversion':
    return base_conds, base_params  # CLIP reads it as BPE pieces.
  table = mesh_lib.gather(embeddings.token_table(base_params))
  tok = base_conds.tokenizer
  if c.init_word:
    init_id = tok.word_id(c.init_word)
    if init_id is None:
      raise errors.ConfigError(f'concept.init_word={c.init_word!r} is not one token of the '
                               f'base\'s vocabulary ({tok.vocab_size} tokens, e.g. '
                               f'{", ".join(list(tok.ids)[2:8])}).')
    row = table[init_id][None]
  else:
    rng = np.random.default_rng(config.seed)
    row = (rng.standard_normal((1, table.shape[1])) * table.std()).astype(np.float32)
  return base_conds.with_tokens([c.token]), embeddings.with_rows(base_params, row)


def resolve_pipeline(config: ml_collections.ConfigDict) -> int:
  """Fills `config` in place from a pipeline folder's configs (no weights read): the
  prediction type and schedule length, the context width, the image size the U-Net was
  built for; the LDM keys the step reads keep ldm_base's defaults. Returns the VAE's
  downsampling factor."""
  folder = Path(config.pipeline)
  unet_cfg = sd_config.read_json(folder / 'unet' / 'config.json')
  vae_cfg = sd_config.read_json(folder / 'vae' / 'config.json')
  schedule, options = sd_config.schedule_from_config(
      sd_config.read_json(folder / 'scheduler' / 'scheduler_config.json'))
  defaults = ldm_base.get_config()
  with config.unlocked():
    for key in finetune_base.FROM_BASE:
      config[key] = defaults[key]
  vae_factor = 2 ** (len(vae_cfg['block_out_channels']) - 1)
  latents = vae_cfg.get('latent_channels', 4)
  if unet_cfg.get('in_channels', latents) != latents:
    raise errors.ConfigError(
        f'{folder / "unet"} takes {unet_cfg["in_channels"]} input channels (an inpainting '
        f'U-Net: latents, mask and masked picture), not the VAE\'s {latents}: fine-tuning '
        'here trains text-to-image U-Nets; sample it with latent/configs/sd_pipeline.py.')
  config.conditioning.width = unet_cfg['cross_attention_dim']
  config.diffusion.prediction = options['prediction']
  config.diffusion.num_timesteps = len(schedule.betas)
  config.data.image_size = unet_cfg['sample_size'] * vae_factor
  impose(config, 'sample.spacing', options['spacing'], "the pipeline's scheduler")
  impose(config, 'sample.clip_x0', options['clip_x0'], "the pipeline's scheduler")
  config.vae_workdir = str(folder / 'vae')  # Read from the pipeline, not a stage-1 run.
  return vae_factor


def impose(config: ml_collections.ConfigDict, key: str, value, source: str) -> None:
  """Sets the dotted `key` to what `source` prescribes; a different value the user gave
  (one that is not finetune_base's default) is named in a warning, never replaced silently.
  Keys that come from the base (finetune_base.FROM_BASE) are not the user's to give."""
  *parents, leaf = key.split('.')
  block, default = config, finetune_base.get_config()
  for name in parents:
    block, default = block[name], None if default is None else default.get(name)
  if block[leaf] != value and default is not None and block[leaf] != default[leaf]:
    logging.warning('%s=%r is replaced by %r, what %s prescribes.', key, block[leaf], value,
                    source)
  block[leaf] = value
