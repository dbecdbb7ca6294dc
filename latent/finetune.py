"""Fine-tuning a trained text LDM on a concept: LoRA, DreamBooth, textual inversion, hypernetworks.

One `Experiment` (stage 'finetune', latent/configs/finetune_*.py) on stage 2's step:
it starts from the base workdir's EMA weights, captions every concept image with the
instance prompt ("sks hair"), and trains what `method` names; everything else is frozen
by the parameter rules (common.params), so it gets no gradient and no optimiser state:

  method             trains (params.trainable)                 writes to WORKDIR
  lora               unet/.../lora_A, lora_B (common.lora)      lora.safetensors (PEFT keys)
  dreambooth         unet/ (+ encoder/ with train_text_encoder) the checkpoint (sample the run)
  textual_inversion  encoder/added_token_embedding              learned_embeds.safetensors
  hypernetwork       hypernetwork/ (latent.hypernetwork)        hypernetwork.safetensors
  controlnet         controlnet/ (latent.controlnet)            controlnet/ (a diffusers
                                                                ControlNetModel folder)

A token the base has never seen joins the vocabulary as an added row of the text
encoder (latent.embeddings); every method then also writes that row as
learned_embeds.safetensors, so the base sampled with its file reads the token too. DreamBooth's prior preservation generates
finetune.num_class_images images of the class prompt with the base model once
(WORKDIR/class_images, resumed if interrupted) and adds their loss, weighted by
finetune.prior_loss_weight, to each step: every batch is batch_size concept images and
batch_size class images.

The base may also be a Stable Diffusion pipeline folder (`pipeline`, diffusers' layout,
latent.pipeline): its U-Net and CLIP text encoder stand behind the same interface
(`PipelineDenoiser`; the unconditional context is the empty prompt's, as in SD), so every
method trains it with the same step: the LoRA file loads with diffusers'
`load_lora_weights`, the textual-inversion token (a new row of CLIP's table) with
`load_textual_inversion`, and DreamBooth writes the fine-tuned pipeline as a diffusers
folder, WORKDIR/pipeline.

A ControlNet run trains on any image folder: each image's control map (Canny edges or a
scribble, controlnet.detector) is made once, mirrored with its image, and fed to the
ControlNet beside its caption (dropped to the null context with controlnet.drop_prompt).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import data, errors, experiment, imageio, logs, loop, lora, mesh as mesh_lib
from common import params as params_lib
from latent import conditions as conditions_lib
from latent import clip, embeddings, hypernetwork, train
from latent import controlnet as controlnet_lib
from latent.configs import finetune_base, ldm_base
from latent.unet import ConditionalUNet, controlled_unet

CLASS_IMAGES = 'class_images'
PIPELINE = 'pipeline'  # DreamBooth on a pipeline folder: the fine-tuned pipeline.
ARTEFACTS = {'lora': 'lora.safetensors', 'textual_inversion': embeddings.FILENAME,
             'hypernetwork': 'hypernetwork.safetensors', 'controlnet': controlnet_lib.FOLDER}
TRAINABLE = {
    'lora': (('.*/lora_[AB]', True), ('.*', False)),
    'dreambooth': (('unet/.*', True), ('.*', False)),
    'dreambooth+text': (('(unet|encoder)/.*', True), ('.*', False)),
    'textual_inversion': (('encoder/' + embeddings.PARAM, True), ('.*', False)),
    'hypernetwork': ((hypernetwork.KEY + '/.*', True), ('.*', False)),
    'controlnet': (('controlnet/.*', True), ('.*', False)),
}


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


def restore_base(base_config, base_workdir, stage1: train.Stage1, mesh):
  """(EMA parameters, conditions) of the base run."""
  exp = train.Experiment(base_config)
  exp.stage1, exp.mesh = stage1, mesh
  exp.conds = conditions_lib.Conditions.load(base_workdir)
  state = experiment.restore_for_sampling(exp, base_workdir, 'train the base text LDM first.')
  logging.info('Fine-tuning the base at step %d.', int(state.step))
  return exp.rules.with_ema(state.params, state.ema_params), exp.conds


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


def class_images(workdir: Path, config, model, params, stage1, conds, schedule,
                 options: dict) -> np.ndarray:
  """finetune.num_class_images images of concept.class_prompt from the base model, written
  to WORKDIR/class_images/N.png once. An interrupted run continues where it stopped; images
  made with other settings (prompt, sampler, base) are made again."""
  f, s = config.finetune, config.sample
  folder = workdir / CLASS_IMAGES
  made_with = {'class_prompt': config.concept.class_prompt, 'base': config.base_workdir or
               config.pipeline, 'seed': config.seed, 'sampler': s.sampler, 'steps': s.num_steps,
               'guidance_scale': s.guidance_scale, 'batch_size': s.batch_size}
  info = folder / 'made_with.json'
  n, b = f.num_class_images, s.batch_size
  if info.is_file() and json.loads(info.read_text()) == made_with:
    have = 0
    while have < n and (folder / f'{have + 1}.png').is_file():
      have += 1
    have -= have % b if have < n else 0  # Restart at a batch boundary: the same noise.
  else:
    have = 0
  if jax.process_count() > 1:  # Every process runs the (sharded) sampler as often.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    have = int(multihost_utils.broadcast_one_to_all(np.int32(have)))
  if have < n:
    if jax.process_index() == 0:
      folder.mkdir(parents=True, exist_ok=True)
      info.write_text(json.dumps(made_with))
    sample_fn = train.make_sample_fn(config, model, schedule, stage1, options=options)
    u = model.unet
    ids = conds.prompt_ids([config.concept.class_prompt])
    with logs.Timed(f'generating {n - have} prior images of {config.concept.class_prompt!r} '
                    f'with the base model (once, into {folder})'):
      for i in range(have, n, b):
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 3), i)
        noise_key, step_key = jax.random.split(key)
        m = min(b, n - i)
        noise = jax.random.normal(noise_key, (m, u.sample_size, u.sample_size, u.in_channels))
        x = sample_fn(params, stage1.params, step_key, jnp.repeat(ids, m, axis=0), noise,
                      s.guidance_scale)
        images = imageio.to_uint8(mesh_lib.gather(x))
        if jax.process_index() == 0:
          for j, image in enumerate(images):
            tmp = folder / f'{i + j + 1}.tmp.png'
            imageio.save_image(image, tmp)
            tmp.replace(folder / f'{i + j + 1}.png')  # Never a half-written image.
    mesh_lib.barrier('class images')
  return np.stack([imageio.read_image(folder / f'{i + 1}.png') for i in range(n)])


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


def resolve_pipeline(config: ml_collections.ConfigDict) -> int:
  """Fills `config` in place from a pipeline folder's configs (no weights read): the
  prediction type and schedule length, the context width, the image size the U-Net was
  built for; the LDM keys the step reads keep ldm_base's defaults. Returns the VAE's
  downsampling factor."""
  from latent import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  folder = Path(config.pipeline)
  unet_cfg = pipeline_lib.read_json(folder / 'unet' / 'config.json')
  vae_cfg = pipeline_lib.read_json(folder / 'vae' / 'config.json')
  schedule, options = pipeline_lib.schedule_from_config(
      pipeline_lib.read_json(folder / 'scheduler' / 'scheduler_config.json'))
  defaults = ldm_base.get_config()
  with config.unlocked():
    for key in finetune_base.FROM_BASE:
      config[key] = defaults[key]
  vae_factor = 2 ** (len(vae_cfg['block_out_channels']) - 1)
  config.conditioning.width = unet_cfg['cross_attention_dim']
  config.diffusion.prediction = options['prediction']
  config.diffusion.num_timesteps = len(schedule.betas)
  config.data.image_size = unet_cfg['sample_size'] * vae_factor
  config.sample.spacing = options['spacing']
  config.sample.clip_x0 = options['clip_x0']
  config.vae_workdir = str(folder / 'vae')  # Read from the pipeline, not a stage-1 run.
  return vae_factor


class PairedBatches:
  """Concept batches followed by prior batches, with per-example loss weights."""

  def __init__(self, concept, prior, prior_weight: float):
    self.concept, self.prior, self.prior_weight = concept, prior, prior_weight

  def __iter__(self):
    return self

  def __next__(self):
    a, b = next(self.concept), next(self.prior)
    out = {k: np.concatenate([a[k], b[k]]) for k in a}
    out['weight'] = np.concatenate([np.ones(len(a['ids']), np.float32),
                                    np.full(len(b['ids']), self.prior_weight, np.float32)])
    return out


class Experiment(train.Experiment):
  """Stage 2's step on concept images, from the base's weights, training `method`'s subset."""
  name = 'fine-tuned denoiser'
  run_keys = ldm_base.RUN_KEYS + finetune_base.RUN_KEYS

  def validate(self):
    try:
      self._validate()
    except ValueError as e:  # The LDM keys' checks, once the base's are in: the user's.
      raise errors.ConfigError(str(e.args[0]) if e.args else repr(e)) from e

  def _validate(self):
    config = self.config
    finetune_base.validate(config)
    if config.pipeline:
      vae_factor = resolve_pipeline(config)
      self.base_config = None
    else:
      self.base_config = resolve(config)
    if config.method == 'controlnet':
      config.conditioning.dropout_prob = config.controlnet.drop_prompt
    if not config.sample.prompts:
      config.sample.prompts = (finetune_base.instance_prompt(config),)
    if not config.train.grid_prompts:
      config.train.grid_prompts = (finetune_base.instance_prompt(config),
                                   *config.finetune.unrelated_prompts)
    if not config.params.trainable:
      method = config.method
      if method == 'dreambooth' and config.finetune.train_text_encoder:
        method = 'dreambooth+text'
      config.params.trainable = TRAINABLE[method]
    finetune_base.validate(config)
    self.rules = params_lib.Rules(config.params)
    if not config.pipeline:
      self.stage1 = train.Stage1(config.vae_workdir)
      ldm_base.validate_values(config, self.stage1.factor)
      vae_factor = self.stage1.factor
    stages = len(config.controlnet.embedding_channels) - 1
    if config.method == 'controlnet' and 2 ** stages != vae_factor:
      raise errors.ConfigError(
          f'controlnet.embedding_channels={tuple(config.controlnet.embedding_channels)} '
          f'downsamples the control image {2 ** stages}x; the VAE\'s factor is {vae_factor}: '
          f'give it {vae_factor.bit_length()} widths (SD\'s factor 8: '
          f'{ldm_base.SD_EMBEDDING_CHANNELS}).')

  def load_base(self):
    """The base's weights with the concept token, and the conditions (vocabulary)."""
    if self.config.pipeline:
      from latent import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
      with logs.Timed(f'loading the pipeline {self.config.pipeline}'):
        self.pipe = pipe = pipeline_lib.load(self.config.pipeline, mesh=self.mesh)
      self.stage1 = train.Stage1.from_vae(pipe.vae, pipe.vae_params, pipe.scaling_factor)
      self.base = {'unet': pipe.unet_params, 'encoder': pipe.text_params}, ClipConditions(
          pipe.tokenizer, self.config.pipeline)
    else:
      self.base = restore_base(self.base_config, self.config.base_workdir, self.stage1,
                               self.mesh)
    base_params, base_conds = self.base  # Kept for DreamBooth's prior images.
    if self.config.method == 'controlnet':  # No concept: the base's vocabulary.
      self.conds, self.base_params = base_conds, base_params
      return
    # The vocabulary is the base's plus the token, whether starting or resuming.
    self.conds, self.base_params = concept_conditions(self.config, base_conds, base_params)

  def record(self):
    if jax.process_index() == 0:
      self.conds.save(self.workdir)

  @functools.cached_property
  def model(self):
    if self.config.pipeline:
      null_ids = tuple(int(i) for i in self.pipe.tokenizer([''])[0][0])
      encoder = self.pipe.text_encoder.clone(added_tokens=self.conds.added_tokens)
      model = PipelineDenoiser(self.pipe.unet, encoder, null_ids)
    else:
      model = train.build_model(self.config, self.conds, self.stage1)
    if self.config.method == 'controlnet':
      model = model.clone(controlnet=controlnet_lib.from_unet(
          model.unet, embedding_channels=self.config.controlnet.embedding_channels))
    return model

  def base_model(self):
    """The model the base's own parameters fit (no added token rows)."""
    if self.config.pipeline:
      return self.model.clone(encoder=self.pipe.text_encoder)
    return train.build_model(self.config, self.base[1], self.stage1)

  @functools.cached_property
  def schedule(self):
    if self.config.pipeline:
      return self.pipe.schedule
    return train.ddpm_train.build_schedule(self.config)

  def sampler_options(self) -> dict:
    """A pipeline's own scheduler settings (steps_offset, DDIM's final alpha)."""
    if not self.config.pipeline:
      return {}
    from latent import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
    options = pipeline_lib.sampler_options(self.pipe, self.config.sample.sampler)
    return {k: v for k, v in options.items() if k in ('steps_offset', 'final_alpha_cumprod')}

  def setup(self):
    config, workdir = self.config, self.workdir
    self.load_base()
    if config.method == 'controlnet':
      images, ids, maps = self.control_examples()
    else:
      images = data.load_dataset(config.data)
      prompt = finetune_base.instance_prompt(config)
      self.conds.prompt_ids([prompt])  # Warns about words the base has never seen.
      ids, _ = self.conds.training_ids([prompt] * len(images))
      logging.info('Concept: %d images captioned %r; method %s.', len(images), prompt,
                   config.method)
    self.examples = {'ids': ids, **train.latent_cache(
        workdir, self.stage1, images, config.sample.batch_size, 'concept_latents.npz')}
    if config.method == 'controlnet':
      self.examples['control'] = maps
      # The artefact's config, checked now rather than at the first checkpoint.
      controlnet_lib.diffusers_config(self.model.controlnet, config.conditioning.width)
    self.prior = None
    if config.finetune.prior_preservation:
      base_params, base_conds = self.base
      prior = class_images(workdir, config, self.base_model(), base_params, self.stage1,
                           base_conds, self.schedule, self.sampler_options())
      class_ids, _ = self.conds.training_ids([config.concept.class_prompt] * len(prior))
      self.prior = {'ids': class_ids, **train.latent_cache(
          workdir, self.stage1, prior, config.sample.batch_size, 'class_latents.npz')}
    self.vae_params = mesh_lib.place(self.stage1.params, self.mesh)

  def control_examples(self):
    """(images, condition ids, uint8 control maps) of a ControlNet run's data: captioned
    where the data has captions (a captions.tsv, the digits), else the empty prompt."""
    c, n = self.config.data, self.config.controlnet
    try:
      images, captions = data.load_captioned_dataset(c)
    except errors.MissingFileError:
      if c.captions:  # A captions file named but missing is the user's error.
        raise
      images = data.load_dataset(c)  # No captions.tsv: the control maps alone.
      captions = [''] * len(images)
    images, ids = train.build_dataset(self.conds, images, captions)
    with logs.Timed(f'making {n.detector} control maps of {len(images)} images'):
      maps = controlnet_lib.control_maps(images, n.detector, n.low_threshold, n.high_threshold,
                                         n.thickness)
    logging.info('ControlNet data: %d images, %.1f%% edge pixels in their maps.', len(images),
                 100 * float((maps[..., 0] > 0).mean()))
    return images, ids, maps

  def init_state(self):
    config = self.config
    params = self.base_params
    rng = jax.random.PRNGKey(config.seed)
    if config.method == 'controlnet':
      params = {**params, 'controlnet': controlnet_lib.init_params(
          self.model.controlnet, params['unet'], rng, config.conditioning.width)}
    elif config.method == 'lora':
      params = lora.add(params, rng, config.lora.rank, config.lora.alpha or None,
                        config.lora.targets)
    elif config.method == 'hypernetwork':
      params = {**params, hypernetwork.KEY: hypernetwork.init(
          rng, config.conditioning.width, tuple(config.hypernetwork.multipliers))}
    return train.ddpm_train.new_state(params, self.tx, self.rules, jax.random.fold_in(rng, 1))

  def create_state(self):
    """init_state eagerly, then placed: the base weights are data, not a jitted constant."""
    shardings = jax.tree.map(lambda s: s.sharding, self.abstract_state())
    # A copy per leaf: the EMA starts as the very arrays of the parameters, and the step
    # donates both.
    return jax.device_put(jax.tree.map(jnp.copy, self.init_state()), shardings)

  def batches(self, start):
    t = self.config.train
    concept = data.BatchIterator(self.examples, t.batch_size, seed=self.config.seed, step=start)
    if self.prior is None:
      return concept
    prior = data.BatchIterator(self.prior, t.batch_size, seed=self.config.seed + 1, step=start)
    return PairedBatches(concept, prior, self.config.finetune.prior_loss_weight)

  def hooks(self, writer):
    t = self.config.train
    def save(step, state):
      if step < t.num_steps:  # The last one is `finish`'s.
        self.write_artefact(state)
    grids = self.control_grid_hook(writer) if self.config.method == 'controlnet' else \
        super().hooks(writer)
    return grids + [loop.Hook(t.checkpoint_every, save, 'writing the artefact')]

  def control_grid_hook(self, writer):
    """Grids of (control map | sample) pairs for the first training examples' maps."""
    config, t = self.config, self.config.train
    k = max(1, min(8, t.num_grid_samples // 2))
    maps, ids = self.examples['control'][:k], self.examples['ids'][:k]
    grid_fn = train.make_sample_fn(config, self.model, self.schedule, self.stage1,
                                   options=self.sampler_options())
    u = self.model.unet
    noise = jax.random.normal(jax.random.PRNGKey(config.seed + 1),
                              (len(ids), u.sample_size, u.sample_size, u.in_channels))

    def write_grid(step, state):
      params = self.rules.with_ema(state.params, state.ema_params)
      x = grid_fn(params, self.vae_params, jax.random.PRNGKey(config.seed + 2), ids, noise,
                  config.sample.guidance_scale, None, None, controlnet_lib.as_input(maps))
      grid = controlnet_lib.control_grid(maps, imageio.to_uint8(mesh_lib.gather(x)))
      logs.write_image_grid(writer, step, 'control_grid', grid)
      if jax.process_index() == 0:
        imageio.save_image(grid, self.workdir / 'samples_during_training' / f'{step:08d}.png')

    return [loop.Hook(t.sample_every, write_grid, 'sampling the control grid')]

  def finish(self, state, ckpt, writer, start):
    self.write_artefact(state)
    if self.config.method == 'dreambooth' and self.config.pipeline:
      self.write_pipeline(state)
    return state

  def write_pipeline(self, state) -> Path | None:
    """DreamBooth on a pipeline: the fine-tuned weights as a diffusers pipeline folder,
    WORKDIR/pipeline (what diffusers users load), replaced at each finish of the run."""
    from latent import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
    params = (self.rules.with_ema(state.params, state.ema_params) if self.config.sample.use_ema
              else state.params)
    params, vae_params = jax.tree.map(mesh_lib.gather, (params, self.pipe.vae_params))
    if jax.process_index() != 0:
      return None
    pipe = dataclasses.replace(self.pipe, unet_params=params['unet'], vae_params=vae_params,
                               text_params=params['encoder'], text_encoder=self.model.encoder)
    folder = self.workdir / PIPELINE
    with logs.Timed(f'writing the fine-tuned pipeline to {folder}'):
      replace_folder(folder, lambda path: pipeline_lib.save(pipe, path))
    return folder

  def write_artefact(self, state) -> Path | None:
    """The method's file (LoRA, embedding, hypernetwork) from the current weights, and the
    concept token's row as learned_embeds.safetensors whenever the token is new (so the base
    sampled with the file reads the token as the run does). Only the small subtrees are
    gathered (every process takes part); process 0 writes."""
    method = self.config.method
    params = (self.rules.with_ema(state.params, state.ema_params) if self.config.sample.use_ema
              else state.params)
    parts = {}
    if method == 'lora':
      parts[method] = lora.split(params)[1]
    elif method == 'hypernetwork':
      parts[method] = params[hypernetwork.KEY]
    elif method == 'controlnet':
      parts[method] = params['controlnet']
    if self.conds.added_tokens:
      parts['textual_inversion'] = embeddings.added_rows(params)
    parts = jax.tree.map(mesh_lib.gather, parts)
    if jax.process_index() != 0:
      return None
    for kind, part in parts.items():
      path = self.workdir / ARTEFACTS[kind]
      if kind == 'lora':
        lora.save(path, part)
      elif kind == 'hypernetwork':
        hypernetwork.save(path, part, tuple(self.config.hypernetwork.multipliers))
      elif kind == 'controlnet':
        replace_folder(path, lambda folder, part=part: controlnet_lib.save(
            folder, self.model.controlnet, part, self.config.conditioning.width))
      else:
        token = self.config.concept.token
        tok = self.conds.tokenizer
        row = tok.ids[token] - (tok.vocab_size - self.conds.added_tokens)
        embeddings.save(path, [token], part[row:row + 1])
      size = sum(f.stat().st_size for f in path.rglob('*')) if path.is_dir() else \
          path.stat().st_size
      logging.info('Wrote %s (%.1f KiB).', path, size / 1024)
    return self.workdir / ARTEFACTS[method] if method in ARTEFACTS else None


def replace_folder(folder: Path, write) -> None:
  """write(path) then put it in place of `folder`, never leaving no whole copy: the new one
  is written as FOLDER.tmp, the old one kept as FOLDER.old until the new one is in place
  (a run killed in between leaves FOLDER.old, which the next call restores first)."""
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  return experiment.train_and_evaluate(Experiment(config), workdir)


def for_sampling(config, workdir: str | Path) -> Experiment:
  """A fine-tuning run's Experiment ready for `restore_for_sampling` of its workdir."""
  exp = Experiment(config)
  exp.validate()
  exp.workdir = Path(workdir)
  exp.mesh = mesh_lib.make_mesh(config.get('mesh'))
  exp.load_base()
  return exp
