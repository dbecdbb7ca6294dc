"""Fine-tuning a trained text LDM on a concept: LoRA, DreamBooth, textual inversion,
hypernetworks, ControlNet.

One `Experiment` (stage 'finetune', latent/configs/finetune_*.py) on stage 2's step: it
starts from the base's EMA weights (latent.finetune.base), captions every concept image
with the instance prompt ("sks hair"), and trains what `method` names (`TRAINABLE`, a
params.trainable rule); everything else is frozen by the parameter rules (common.params),
so it gets no gradient and no optimiser state. What each method writes is
latent.finetune.artefacts'.

A token the base has never seen joins the vocabulary as an added row of the text encoder
(latent.finetune.embeddings). DreamBooth's prior preservation (latent.finetune.dreambooth)
generates finetune.num_class_images images of the class prompt with the base model once and
adds their loss, weighted by finetune.prior_loss_weight, to each step.

The base may also be a Stable Diffusion pipeline folder (`pipeline`, latent.sd): its U-Net
and CLIP text encoder stand behind the same interface (latent.sd.denoiser; the
unconditional context is the empty prompt's, as in SD), so every method trains it with the
same step.

A ControlNet run trains on any image folder: each image's control map (Canny edges or a
scribble, controlnet.detector) is made once, mirrored with its image, and fed to the
ControlNet beside its caption (dropped to the null context with controlnet.drop_prompt).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from common import data, errors, experiment, imageio, logs, loop, lora, mesh as mesh_lib
from common import params as params_lib
from latent.configs import finetune_base, ldm_base
from latent.controlnet import maps as maps_lib
from latent.controlnet import model as controlnet_lib
from latent.finetune import artefacts, embeddings, hypernetwork
from latent.finetune.base import (concept_conditions, impose, resolve, resolve_pipeline,
                                  restore_base)
from latent.finetune.dreambooth import PairedBatches, class_images
from latent.ldm import sampler, train
from latent.sd import pipeline as pipeline_lib
from latent.sd.denoiser import ClipConditions, PipelineDenoiser
from latent.vae.codec import Codec

TRAINABLE = {
    'lora': (('.*/lora_[AB]', True), ('.*', False)),
    'dreambooth': (('unet/.*', True), ('.*', False)),
    'dreambooth+text': (('(unet|encoder)/.*', True), ('.*', False)),
    'textual_inversion': (('encoder/' + embeddings.PARAM, True), ('.*', False)),
    'hypernetwork': ((hypernetwork.KEY + '/.*', True), ('.*', False)),
    'controlnet': (('controlnet/.*', True), ('.*', False)),
}


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
      impose(config, 'conditioning.dropout_prob', config.controlnet.drop_prompt,
             'controlnet.drop_prompt')
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
      self.stage1 = Codec.from_workdir(config.vae_workdir)
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
      with logs.Timed(f'loading the pipeline {self.config.pipeline}'):
        self.pipe = pipe = pipeline_lib.load(self.config.pipeline, mesh=self.mesh)
      self.stage1 = pipeline_lib.codec(pipe)
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
      encoder = self.pipe.text_encoder.clone(added_tokens=self.conds.added_tokens)
      model = PipelineDenoiser(self.pipe.unet, encoder, pipeline_lib.null_ids(self.pipe))
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
    self.examples = {'ids': ids, **self.encoded(images, 'concept_latents.npz')}
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
      self.prior = {'ids': class_ids, **self.encoded(prior, 'class_latents.npz')}
    self.vae_params = mesh_lib.place(self.stage1.params, self.mesh)

  def encoded(self, images, cache_name: str) -> dict:
    """The examples' VAE inputs: their cached posterior moments (train.latent_cache, the
    default), or the uint8 images themselves, encoded at every step."""
    if self.config.train.latent_cache:
      return train.latent_cache(self.workdir, self.stage1, images, self.config.sample.batch_size,
                                cache_name)
    return {'images': images}

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
      maps = maps_lib.control_maps(images, n.detector, n.low_threshold, n.high_threshold,
                                   n.thickness)
    logging.info('ControlNet data: %d images, %.1f%% edge pixels in their maps.', len(images),
                 100 * float((maps[..., 0] > 0).mean()))
    return images, ids, maps

  def init_state(self):
    config = self.config
    params = self.base_params
    # Two keys, each used once (fold_in(rng, 1) would be split(rng)[1], a key the adapters'
    # initialisers split from rng).
    rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    if config.method == 'controlnet':
      params = {**params, 'controlnet': controlnet_lib.init_params(
          self.model.controlnet, params['unet'], rng, config.conditioning.width)}
    elif config.method == 'lora':
      params = lora.add(params, rng, config.lora.rank, config.lora.alpha or None,
                        config.lora.targets)
    elif config.method == 'hypernetwork':
      params = {**params, hypernetwork.KEY: hypernetwork.init(
          rng, config.conditioning.width, tuple(config.hypernetwork.multipliers))}
    return train.ddpm_train.new_state(params, self.tx, self.rules, state_rng)

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
    grid_fn = sampler.for_config(config, self.model, self.schedule, self.stage1,
                                 self.sampler_options())
    u = self.model.unet
    noise = jax.random.normal(jax.random.PRNGKey(config.seed + 1),
                              (len(ids), u.sample_size, u.sample_size, u.in_channels))

    def write_grid(step, state):
      params = self.rules.of_state(state)
      x = grid_fn(params, self.vae_params, jax.random.PRNGKey(config.seed + 2), ids, noise,
                  config.sample.guidance_scale, None, None, controlnet_lib.as_input(maps))
      grid = maps_lib.control_grid(maps, imageio.to_uint8(mesh_lib.gather(x)))
      logs.write_image_grid(writer, step, 'control_grid', grid)
      if jax.process_index() == 0:
        imageio.save_image(grid, self.workdir / 'samples_during_training' / f'{step:08d}.png')

    return [loop.Hook(t.sample_every, write_grid, 'sampling the control grid')]

  def finish(self, state, ckpt, writer, start):
    self.write_artefact(state)
    if self.config.method == 'dreambooth' and self.config.pipeline:
      self.write_pipeline(state)
    return state

  def tuned_params(self, state):
    """The weights the artefacts are written from: EMA unless sample.use_ema is off."""
    return self.rules.of_state(state, self.config.sample.use_ema)

  def write_artefact(self, state) -> Path | None:
    return artefacts.write(self.workdir, self.config, self.tuned_params(state), self.conds,
                           self.model)

  def write_pipeline(self, state) -> Path | None:
    return artefacts.write_pipeline(self.workdir, self.pipe, self.tuned_params(state),
                                    self.model.encoder)


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
