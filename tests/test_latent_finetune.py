"""Fine-tuning a text LDM on a concept (latent/finetune/): what each method trains and
writes, what stays bit-identical, sampling with its artefact, and bad input.

A tiny digits VAE and text LDM (the base: "digit seven" captions) are trained once for
the module; the concept is six pictures of the digit seven taught as "sks digit". The
end-to-end run of each method is in the slow tier; LoRA on a tiny Stable Diffusion
pipeline (checked against diffusers' loader) and the errors run by default.
"""

import json
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_digits

from common import errors, imageio, lora
from common.logs import read_scalars
from common import atomic
from latent.finetune import artefacts, dreambooth, embeddings, hypernetwork
from latent.finetune import base as base_lib
from latent.finetune import experiment as finetune
from latent.ldm import sample, sampler, train
from latent.sd import sample as sd_sample
from latent.configs import (controlnet_anime, finetune_dreambooth, finetune_hypernetwork,
                            finetune_lora, finetune_textual_inversion)
from test_latent_ldm import tiny_ldm_config, tiny_vae_config
from test_latent_pipeline import diffusers_images, sd_folder  # noqa: F401  (sd_folder: a fixture)

METHOD_CONFIGS = {'lora': finetune_lora, 'dreambooth': finetune_dreambooth,
                  'textual_inversion': finetune_textual_inversion,
                  'hypernetwork': finetune_hypernetwork, 'controlnet': controlnet_anime}


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  from latent.vae import train as vae_train  # pylint: disable=g-import-not-at-top
  vae_dir = tmp_path_factory.mktemp('vae')
  vae_train.train_and_evaluate(tiny_vae_config(), str(vae_dir))
  workdir = tmp_path_factory.mktemp('base')
  config = tiny_ldm_config(vae_dir)
  config.train.num_steps = 60
  config.train.checkpoint_every = 60
  config.train.sample_every = 0
  train.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture(scope='module')
def concept_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp('concept')
  digits = load_digits()
  sevens = digits.images[digits.target == 7][:6]
  for i, d in enumerate(sevens):
    gray = np.rint(255.0 - d * (255.0 / 16.0)).astype(np.uint8)
    imageio.save_image(np.repeat(gray[..., None], 3, -1), folder / f'{i}.png')
  return folder


def ft_config(method, base, concept_dir, **overrides):
  config = METHOD_CONFIGS[method].get_config()
  config.base_workdir = str(base)
  config.data.path = str(concept_dir)
  config.concept.class_prompt = 'digit'
  config.concept.init_word = 'seven' if method == 'textual_inversion' else ''
  config.finetune.unrelated_prompts = ('digit one',)
  config.finetune.num_class_images = 8
  if method in ('lora', 'hypernetwork'):
    config.optim.learning_rate = 1e-3  # The tiny base moves visibly in 30 steps.
  t = config.train
  t.batch_size = 4
  t.num_steps = 30
  t.log_every = 10
  t.checkpoint_every = 30
  t.sample_every = 30
  t.num_grid_samples = 4
  t.async_checkpoint = False
  config.sample.num_steps = 4
  config.sample.batch_size = 4
  config.sample.num_per_prompt = 2
  config.sample.prompts = ('sks digit',)
  return set_keys(config, overrides)


def set_keys(config, overrides: dict):
  """config with {'a.b': value} overrides set."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def pipeline_config(method, folder, concept_dir, steps, **overrides):
  """A fine-tuning config on the tiny SD pipeline folder: `steps` steps, one checkpoint."""
  return ft_config(method, '', concept_dir, **{
      'pipeline': str(folder), 'concept.class_prompt': 'hair', 'train.num_steps': steps,
      'train.checkpoint_every': steps, 'train.sample_every': steps,
      'finetune.unrelated_prompts': ('red hair',), 'sample.prompts': ('sks hair',),
      **overrides})


def changed(before, after):
  """Paths whose values differ (both trees flattened; keys of `before` only)."""
  a, b = flat(before), flat(after)
  return sorted(k for k in a if not np.array_equal(a[k], b[k]))


def base_params(base):
  config = finetune_lora.get_config()  # Any method: only the base is read.
  config.base_workdir = str(base)
  config.data.path = 'unused'
  exp = finetune.Experiment(config)
  exp.validate()
  exp.mesh = finetune.mesh_lib.make_mesh(None)
  return base_lib.restore_base(exp.base_config, str(base), exp.stage1, exp.mesh)


def sample_images(config, workdir, out):
  config = config.copy_and_resolve_references()
  config.sample.output_dir = str(out)
  return imageio.load_images(sample.generate(config, workdir))[0]


@pytest.mark.slow
def test_lora_trains_adapters_only_and_its_file_samples_the_base_like_the_run(
    base, concept_dir, tmp_path):
  config = ft_config('lora', base, concept_dir)
  state = finetune.train_and_evaluate(config, str(tmp_path / 'ft'))
  losses = [v for _, v in read_scalars(tmp_path / 'ft', 'loss')]
  assert len(losses) == 3 and losses[-1] < losses[0], losses
  params0, _ = base_params(base)
  # The base weights are bit-identical; only A and B moved (B from exactly zero).
  trained_base, adapter = lora.split(state.params)
  assert changed(params0, trained_base) == []
  assert float(jnp.abs(jax.tree.leaves(adapter)[1]).max()) > 0
  assert jax.tree.structure(state.opt_state) != jax.tree.structure(state.params)
  path = tmp_path / 'ft' / 'lora.safetensors'
  assert path.is_file() and path.stat().st_size < 0.2 * sum(
      v.nbytes for v in jax.tree.leaves(params0))
  assert (tmp_path / 'ft' / 'samples_during_training' / f'{30:08d}.png').is_file()
  # The base sampled with the LoRA file gives the run's own samples (an unrelated prompt:
  # the base lacks the new token), and differs from the base alone.
  unrelated = ('digit one',)
  config.sample.prompts = unrelated
  ran = sample_images(config, tmp_path / 'ft', tmp_path / 'run')
  base_config = ml_collections.ConfigDict(json.loads((base / 'config.json').read_text()))
  base_config.sample = config.sample.copy_and_resolve_references()
  base_config.sample.use_ema = True  # The fine-tuning started from the base's EMA.
  plain = sample_images(base_config, base, tmp_path / 'plain')
  base_config.sample.adapters = (f'{path}:1.0',)
  adapted = sample_images(base_config, base, tmp_path / 'adapted')
  assert np.abs(ran.astype(int) - adapted).max() <= 2
  assert np.abs(plain.astype(int) - adapted).max() > 10
  # The new token's row comes as learned_embeds.safetensors: with both files the base draws
  # the concept prompt as the run does.
  config.sample.prompts = base_config.sample.prompts = ('sks digit',)
  base_config.sample.embeddings = (str(tmp_path / 'ft' / embeddings.FILENAME),)
  ran = sample_images(config, tmp_path / 'ft', tmp_path / 'run_sks')
  assert np.abs(ran.astype(int) - sample_images(base_config, base, tmp_path / 'sks')).max() <= 2


@pytest.mark.slow
def test_textual_inversion_trains_one_row_and_its_file_gives_the_token_to_the_base(
    base, concept_dir, tmp_path):
  config = ft_config('textual_inversion', base, concept_dir)
  state = finetune.train_and_evaluate(config, str(tmp_path / 'ft'))
  params0, conds0 = base_params(base)
  assert 'sks' not in conds0.tokenizer.ids
  # Every weight of the base (the whole token table, the text encoder, the U-Net) is
  # bit-identical; the new row moved away from its initial word's.
  row = np.asarray(state.params['encoder'][embeddings.PARAM])
  assert changed(params0, state.params) == [] and row.shape == (1, 32)
  seven = np.asarray(params0['encoder']['token_embedding']['embedding'])[
      conds0.tokenizer.ids['seven']]
  assert np.abs(row[0] - seven).max() > 1e-3
  learned = embeddings.load(tmp_path / 'ft' / embeddings.FILENAME, 32)
  assert list(learned) == ['sks'] and np.array_equal(learned['sks'], row)
  # The base with the embedding file samples "sks digit" as the run does.
  ran = sample_images(config, tmp_path / 'ft', tmp_path / 'run')
  base_config = ml_collections.ConfigDict(json.loads((base / 'config.json').read_text()))
  base_config.sample = config.sample.copy_and_resolve_references()
  base_config.sample.use_ema = True  # The fine-tuning started from the base's EMA.
  base_config.sample.embeddings = (str(tmp_path / 'ft' / embeddings.FILENAME),)
  with_file = sample_images(base_config, base, tmp_path / 'with_file')
  assert np.abs(ran.astype(int) - with_file).max() <= 2


@pytest.mark.slow
def test_hypernetwork_starts_as_a_no_op_trains_alone_and_samples_at_a_strength(
    base, concept_dir, tmp_path):
  params0, conds0 = base_params(base)
  config = ft_config('hypernetwork', base, concept_dir)
  model, _, _, _ = sample.restore(
      ml_collections.ConfigDict(json.loads((base / 'config.json').read_text())), base)
  u = model.unet
  z = jax.random.normal(jax.random.PRNGKey(0), (2, u.sample_size, u.sample_size, u.in_channels))
  ctx, mask, _, _ = sampler.condition(model, params0, jnp.asarray(conds0.prompt_ids(['digit one'] * 2)))
  t = jnp.array([10, 60])
  hyper = {**params0, hypernetwork.KEY: hypernetwork.init(jax.random.PRNGKey(1), 32)}
  assert np.array_equal(sampler.denoise(model, params0, z, t, ctx, mask),
                        sampler.denoise(model, hyper, z, t, ctx, mask))
  trained = {**params0, hypernetwork.KEY: jax.tree.map(lambda a: a + 0.05, hyper['hypernetwork'])}
  assert not np.allclose(sampler.denoise(model, params0, z, t, ctx, mask),
                         sampler.denoise(model, trained, z, t, ctx, mask), atol=1e-3)

  state = finetune.train_and_evaluate(config, str(tmp_path / 'ft'))
  assert changed(params0, state.params) == []
  assert changed(hyper[hypernetwork.KEY], state.params[hypernetwork.KEY])  # It trained.
  path = tmp_path / 'ft' / 'hypernetwork.safetensors'
  loaded = hypernetwork.load(path, 32)
  assert changed(loaded, jax.device_get(state.params[hypernetwork.KEY])) == []
  config.sample.prompts = ('digit one',)
  ran = sample_images(config, tmp_path / 'ft', tmp_path / 'run')
  base_config = ml_collections.ConfigDict(json.loads((base / 'config.json').read_text()))
  base_config.sample = config.sample.copy_and_resolve_references()
  base_config.sample.use_ema = True  # The fine-tuning started from the base's EMA.
  plain = sample_images(base_config, base, tmp_path / 'plain')
  base_config.sample.hypernetwork = f'{path}:1'
  assert np.abs(ran.astype(int) - sample_images(base_config, base, tmp_path / 'one')).max() <= 2
  base_config.sample.hypernetwork = f'{path}:0'
  assert np.array_equal(plain, sample_images(base_config, base, tmp_path / 'zero'))


@pytest.mark.slow
def test_dreambooth_with_prior_preservation_caches_class_images_and_freezes_the_text_encoder(
    base, concept_dir, tmp_path):
  config = ft_config('dreambooth', base, concept_dir, **{'train.num_steps': 10,
                                                         'train.checkpoint_every': 10})
  state = finetune.train_and_evaluate(config, str(tmp_path / 'ft'))
  params0, _ = base_params(base)
  moved = changed(params0, state.params)
  assert moved and all(k.startswith("['unet']") for k in moved)
  folder = tmp_path / 'ft' / dreambooth.CLASS_IMAGES
  files = sorted(folder.glob('*.png'))
  assert len(files) == 8 and imageio.read_image(files[0]).shape == (16, 16, 3)
  stamps = [f.stat().st_mtime_ns for f in files]
  # Resuming to more steps reuses the class images (and an interrupted generation would
  # continue after the last one written).
  config.train.num_steps = 20
  finetune.train_and_evaluate(config, str(tmp_path / 'ft'))
  assert [f.stat().st_mtime_ns for f in files] == stamps


def controlnet_config(base, **overrides):
  from latent.configs import controlnet_demo  # pylint: disable=g-import-not-at-top
  config = controlnet_demo.get_config()
  config.base_workdir = str(base)
  config.data.max_images = 256
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 0
  t = config.train
  t.batch_size = 16
  t.num_steps = 120
  t.log_every = 40
  t.checkpoint_every = 120
  t.sample_every = 120
  t.num_grid_samples = 8
  t.async_checkpoint = False
  s = config.sample
  s.num_steps = 4
  s.batch_size = 4
  s.num_per_prompt = 4
  s.prompts = ('',)
  return set_keys(config, overrides)


@pytest.mark.slow
def test_controlnet_trains_alone_reads_its_maps_and_writes_a_diffusers_folder(base, tmp_path):
  from latent.controlnet import maps, model as controlnet  # pylint: disable=g-import-not-at-top
  from ddpm import diffusion  # pylint: disable=g-import-not-at-top
  config = controlnet_config(base)
  workdir = tmp_path / 'cn'
  state = finetune.train_and_evaluate(config, str(workdir))
  params0, _ = base_params(base)
  assert changed(params0, state.params) == []  # The whole base is bit-identical.
  zero_convs = state.params['controlnet']['controlnet_mid_block']['kernel']
  assert float(jnp.abs(zero_convs).max()) > 0  # They left zero.
  assert (workdir / 'samples_during_training' / f'{120:08d}.png').is_file()

  # On a fixed batch (the same t and eps), the trained ControlNet predicts the noise better
  # than the base (which is the fresh ControlNet's output, exactly), and better with each
  # picture's own map than with another picture's: it reads the map.
  exp = finetune.for_sampling(config, workdir)
  images, captions = finetune.data.load_captioned_dataset(config.data)
  images, ids = train.build_dataset(exp.conds, images[:64], captions[:64])
  maps = controlnet.as_input(maps.control_maps(images, 'canny'))
  mean, _ = exp.stage1.moments(exp.stage1.params, jnp.asarray(images))
  z0 = exp.stage1.scale_factor * mean
  t = jnp.arange(64) % 50 + 20
  eps = jax.random.normal(jax.random.PRNGKey(5), z0.shape)
  zt = diffusion.q_sample(exp.schedule, z0, t, eps)

  def mse(params, control):
    context, mask, _, _ = sampler.condition(exp.model, params, jnp.asarray(ids))
    out = sampler.denoise(exp.model, params, zt, t, context, mask, control=control)
    return float(jnp.mean((out - eps) ** 2))
  trained = jax.device_get(state.params)
  fresh = {**params0, 'controlnet': controlnet.init_params(
      exp.model.controlnet, params0['unet'], jax.random.PRNGKey(0), 32)}
  assert mse(fresh, maps) == mse(params0 | {'controlnet': fresh['controlnet']}, None)
  assert mse(trained, maps) < 0.97 * mse(fresh, maps), (mse(trained, maps), mse(fresh, maps))
  assert mse(trained, maps) < mse(trained, jnp.roll(maps, 1, axis=0))

  # WORKDIR/controlnet is a diffusers ControlNetModel folder; read back, it is the run's.
  folder = workdir / controlnet.FOLDER
  loaded_cn, loaded = controlnet.load(folder, exp.model.unet, params0['unet'], 32)
  assert changed(trained['controlnet'], loaded) == []
  import diffusers  # pylint: disable=g-import-not-at-top
  assert diffusers.ControlNetModel.from_pretrained(folder).config.conditioning_embedding_out_channels == [16, 32, 64]

  # Sampling from control pictures: one image per prompt and map, and the map beside it.
  pictures = tmp_path / 'pictures'
  for i, image in enumerate(images[:2]):
    imageio.save_image(image, pictures / f'{i}.png')
  config.sample.control_image = str(pictures)
  out = sample_images(config, workdir, tmp_path / 'out')
  assert out.shape == (4, 16, 16, 3)
  assert (tmp_path / 'out_control_grid.png').is_file()
  config.sample.control_image = str(tmp_path / 'nothere')
  with pytest.raises(errors.MissingFileError, match='sample.control_image.*nothere'):
    sample_images(config, workdir, tmp_path / 'out2')
  # A ControlNet embedding that does not reach the latent grid is named before any compute.
  with pytest.raises(errors.ConfigError, match='controlnet.embedding_channels'):
    finetune.train_and_evaluate(controlnet_config(
        base, **{'controlnet.embedding_channels': (16, 32, 96, 256)}), str(tmp_path / 'bad'))
  assert not (tmp_path / 'bad' / 'config.json').exists()


@pytest.mark.slow
def test_latent_cache_off_encodes_the_images_every_step(base, concept_dir, tmp_path):
  config = ft_config('lora', base, concept_dir, **{
      'train.latent_cache': False, 'train.num_steps': 4, 'train.checkpoint_every': 4,
      'train.sample_every': 4, 'train.log_every': 2})
  state = finetune.train_and_evaluate(config, str(tmp_path / 'ft'))
  assert int(state.step) == 4
  assert not (tmp_path / 'ft' / 'concept_latents.npz').exists()
  losses = [v for _, v in read_scalars(tmp_path / 'ft', 'loss')]
  assert len(losses) == 2 and all(np.isfinite(losses))


def test_prior_preservation_loss_is_diffusers_instance_plus_weighted_prior():
  """train_dreambooth.py's loss: mse(instance half) + prior_loss_weight * mse(prior half),
  each a mean over its own half, against a float64 formula on fixed inputs."""
  from ddpm import diffusion, schedules  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a = iter([{'ids': np.zeros((3, 1), np.int32)}])
  b = iter([{'ids': np.ones((3, 1), np.int32)}])
  batch = next(dreambooth.PairedBatches(a, b, 0.7))
  assert batch['ids'][:, 0].tolist() == [0, 0, 0, 1, 1, 1]
  schedule = schedules.make_schedule('linear', 100)
  x0, eps = rng.standard_normal((2, 6, 4, 4, 2)).astype(np.float32)
  t = np.array([3, 50, 99, 0, 20, 70], np.int32)
  pred = rng.standard_normal((6, 4, 4, 2)).astype(np.float32)
  loss, _ = diffusion.denoising_loss(schedule, lambda xt, t: pred, x0, t, eps,
                                     weights=batch['weight'])
  err = np.mean((pred.astype(np.float64) - eps) ** 2, axis=(1, 2, 3))
  want = err[:3].mean() + 0.7 * err[3:].mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)


@pytest.mark.slow
def test_bad_input_is_a_clear_error_before_anything_is_written(base, concept_dir, tmp_path):
  def fails(match, error=(errors.UserError, ValueError), method='lora', **overrides):
    workdir = tmp_path / 'ft'
    with pytest.raises(error, match=match):
      finetune.train_and_evaluate(ft_config(method, base, concept_dir, **overrides), str(workdir))
    assert not (workdir / 'config.json').exists()

  empty = tmp_path / 'empty'
  empty.mkdir()
  fails('no .*image|No image', **{'data.path': str(empty)})
  fails("'digit' is already in the base's vocabulary", method='textual_inversion',
        **{'concept.token': 'digit', 'concept.instance_prompt': 'digit'})
  fails("init_word='purple' is not one token of the base's vocabulary", method='textual_inversion',
        **{'concept.init_word': 'purple'})
  vae_dir = json.loads((base / 'config.json').read_text())['vae_workdir']
  fails('is not a text LDM', **{'base_workdir': vae_dir})
  fails('has no config.json', **{'base_workdir': str(tmp_path)})
  fails('prior_preservation is DreamBooth', **{'finetune.prior_preservation': True})


@pytest.mark.slow
def test_artefacts_for_another_model_are_named(base, tmp_path):
  params0, conds0 = base_params(base)
  embeddings.save(tmp_path / 'e.safetensors', ['xyz'], np.zeros((1, 64)))
  with pytest.raises(errors.ConfigError, match=r"'xyz' has shape \(1, 64\).*width 32"):
    embeddings.apply_files(params0, conds0, [str(tmp_path / 'e.safetensors')])
  embeddings.save(tmp_path / 'd.safetensors', ['digit'], np.zeros((1, 32)))
  with pytest.raises(errors.ConfigError, match="'digit' is already in the vocabulary"):
    embeddings.apply_files(params0, conds0, [str(tmp_path / 'd.safetensors')])
  hypernetwork.save(tmp_path / 'h.safetensors', hypernetwork.init(jax.random.PRNGKey(0), 64),
                    (1, 2, 1))
  with pytest.raises(errors.ConfigError, match="widths 64; this model's is 32"):
    hypernetwork.apply_file(params0, f'{tmp_path / "h.safetensors"}:0.5', 32)
  with pytest.raises(errors.MissingFileError, match='nothere'):
    hypernetwork.apply_file(params0, 'nothere.safetensors', 32)


def test_command_line_names_a_base_that_is_not_a_text_ldm(tmp_path):
  from test_cli import _one_line_error, _run  # pylint: disable=g-import-not-at-top
  base = tmp_path / 'vae_run'
  base.mkdir()
  (base / 'config.json').write_text(json.dumps({'stage': 'vae'}))
  proc = _run('latent.main', '--config=latent/configs/finetune_lora.py',
              f'--workdir={tmp_path / "ft"}', f'--config.base_workdir={base}',
              f'--config.data.path={tmp_path}')
  assert 'is not a text LDM' in _one_line_error(proc)
  assert not (tmp_path / 'ft').exists()


def test_lora_on_a_pipeline_folder_loads_in_diffusers_with_our_images(sd_folder, concept_dir,
                                                                      tmp_path):
  """LoRA on Stable Diffusion weights (a tiny random pipeline): the base stays bit-identical,
  and diffusers' own loader reads our file and draws what we draw with it."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from latent.sd import pipeline  # pylint: disable=g-import-not-at-top
  folder, reference = sd_folder
  config = pipeline_config('lora', folder, concept_dir, 10, **{'optim.learning_rate': 1e-2})
  state = finetune.train_and_evaluate(config, str(tmp_path / 'ft'))
  pipe = pipeline.load(folder)
  base, adapter = lora.split(state.params)
  assert changed({'unet': pipe.unet_params, 'encoder': pipe.text_params}, base) == []

  path = tmp_path / 'ft' / 'lora.safetensors'
  unet = lora.merge_adapters({'unet': pipe.unet_params},
                             [(lora.load(path, {'unet': pipe.unet_params}), 1.0)])['unet']
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  prompts = ['sks hair', 'red hair']
  run = lambda p: pipeline.generate(p, prompts, negative_prompt='red', guidance_scale=3.0,
                                    latents=latents, sampler='ddim', num_steps=6)
  got, plain = run(dataclasses.replace(pipe, unet_params=unet)), run(pipe)
  reference.load_lora_weights(str(tmp_path / 'ft'), weight_name='lora.safetensors')
  try:
    want = diffusers_images(reference, prompts, latents, 6, 3.0)
  finally:
    reference.unload_lora_weights()
  assert np.abs(got.astype(np.int32) - plain).max() > 3  # The adapter acts ...
  assert np.abs(got.astype(np.int32) - want).max() <= 1  # ... as diffusers applies it.
  # And sampling the fine-tuning run itself works from its config.
  images = sample_images(config, tmp_path / 'ft', tmp_path / 'out')
  assert images.shape == (2, 16, 16, 3)
  # The pipeline sampler takes the file too (sd_pipeline.py's sample.adapters).
  from latent.configs import sd_pipeline  # pylint: disable=g-import-not-at-top
  sd = sd_pipeline.get_config()
  sd.pipeline, sd.sample.prompts, sd.sample.num_per_prompt = str(folder), ('sks hair',), 2
  sd.sample.num_steps, sd.sample.sampler = 4, 'ddim'
  outputs = []
  for strength in (0, 1):
    sd.sample.adapters = (f'{path}:{strength}',)
    sd.sample.output_dir = str(tmp_path / f'sd_{strength}')
    outputs.append(imageio.load_images(sd_sample.generate(sd, tmp_path))[0])
  assert np.abs(outputs[0].astype(int) - outputs[1]).max() > 3


def test_textual_inversion_on_a_pipeline_loads_in_diffusers_with_our_images(sd_folder,
                                                                           concept_dir, tmp_path):
  """Textual inversion on a pipeline's CLIP: only the new token's row trains (away from the
  init word's), and diffusers' load_textual_inversion reads our learned_embeds file and
  draws what we draw with it (sd_pipeline.py's sample.embeddings)."""
  import copy  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  from latent.sd import pipeline  # pylint: disable=g-import-not-at-top
  folder, reference = sd_folder
  config = pipeline_config('textual_inversion', folder, concept_dir, 10, **{
      'concept.init_word': 'hair', 'optim.learning_rate': 5e-2})
  state = finetune.train_and_evaluate(config, str(tmp_path / 'ft'))
  pipe = pipeline.load(folder)
  row = np.asarray(state.params['encoder'][embeddings.PARAM])
  hair = pipe.tokenizer.word_id('hair')
  assert row.shape == (1, 32) and not np.allclose(row[0], pipe.text_params[
      'embeddings.token_embedding']['embedding'][hair])  # Trained away from 'hair'.
  assert changed({'unet': pipe.unet_params, 'encoder': pipe.text_params}, state.params) == []

  path = tmp_path / 'ft' / 'learned_embeds.safetensors'
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  prompts = ['sks hair', 'red hair']
  got = pipeline.generate(pipeline.with_embeddings(pipe, [str(path)]), prompts,
                          negative_prompt='red', guidance_scale=3.0, latents=latents,
                          sampler='ddim', num_steps=6)
  theirs = diffusers.StableDiffusionPipeline(**copy.deepcopy(reference.components))
  theirs.load_textual_inversion(str(path))
  assert np.abs(got.astype(np.int32) - diffusers_images(theirs, prompts, latents, 6, 3.0)).max() <= 1
  # The run samples itself with the token, as the file does.
  images = sample_images(config, tmp_path / 'ft', tmp_path / 'out')
  assert images.shape == (config.sample.num_per_prompt, 16, 16, 3)
  # So does the pipeline sampler (sd_pipeline.py's sample.embeddings).
  from latent.configs import sd_pipeline  # pylint: disable=g-import-not-at-top
  sd = sd_pipeline.get_config()
  sd.pipeline, sd.sample.prompts, sd.sample.num_per_prompt = str(folder), ('sks hair',), 1
  sd.sample.num_steps, sd.sample.embeddings = 4, (str(path),)
  sd.sample.output_dir = str(tmp_path / 'sd')
  assert len(imageio.load_images(sd_sample.generate(sd, tmp_path))[0]) == 1


@pytest.mark.slow
def test_dreambooth_on_a_pipeline_writes_a_diffusers_pipeline(sd_folder, concept_dir, tmp_path):
  """DreamBooth on a pipeline folder writes WORKDIR/pipeline: diffusers opens it and draws
  what the fine-tuned run draws; the text encoder stays the base's."""
  import diffusers  # pylint: disable=g-import-not-at-top
  from latent.sd import pipeline  # pylint: disable=g-import-not-at-top
  folder, _ = sd_folder
  config = pipeline_config('dreambooth', folder, concept_dir, 6, **{'optim.learning_rate': 1e-3})
  state = finetune.train_and_evaluate(config, str(tmp_path / 'ft'))
  saved = tmp_path / 'ft' / artefacts.PIPELINE
  tuned = pipeline.load(saved)
  base = pipeline.load(folder)
  assert changed({'encoder': base.text_params}, {'encoder': tuned.text_params}) == []
  assert changed({'unet': base.unet_params}, {'unet': tuned.unet_params}) != []
  written = (state.ema_params if config.sample.use_ema else state.params)['unet']
  assert changed({'unet': tuned.unet_params}, {'unet': written}) == []
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  prompts = ['sks hair', 'red hair']
  got = pipeline.generate(tuned, prompts, negative_prompt='red', guidance_scale=3.0,
                          latents=latents, sampler='ddim', num_steps=6)
  want = diffusers_images(diffusers.StableDiffusionPipeline.from_pretrained(saved), prompts,
                          latents, 6, 3.0)
  assert np.abs(got.astype(np.int32) - want).max() <= 1


@pytest.mark.slow
def test_controlnet_on_a_pipeline_folder_trains_alone_and_writes_a_controlnetmodel(
    sd_folder, concept_dir, tmp_path):
  """ControlNet on an SD pipeline: only the ControlNet moves; WORKDIR/controlnet opens in
  diffusers and reads back as the run's weights, fitted to the pipeline's U-Net."""
  import diffusers  # pylint: disable=g-import-not-at-top
  from latent.controlnet import model as controlnet  # pylint: disable=g-import-not-at-top
  from latent.sd import pipeline  # pylint: disable=g-import-not-at-top
  folder, _ = sd_folder
  config = pipeline_config('controlnet', folder, concept_dir, 6, **{
      'optim.learning_rate': 1e-3, 'controlnet.embedding_channels': (8, 16),
      'sample.prompts': ('hair',)})
  state = finetune.train_and_evaluate(config, str(tmp_path / 'ft'))
  base = pipeline.load(folder)
  assert changed({'unet': base.unet_params, 'encoder': base.text_params}, state.params) == []
  saved = tmp_path / 'ft' / controlnet.FOLDER
  _, loaded = controlnet.load(saved, base.unet, base.unet_params, 32)
  assert changed(jax.device_get(state.params['controlnet']), loaded) == []
  assert float(np.abs(loaded['controlnet_mid_block']['kernel']).max()) > 0
  assert diffusers.ControlNetModel.from_pretrained(saved).config.cross_attention_dim == 32


def test_replace_folder_never_leaves_no_whole_copy(tmp_path):
  def write(text):
    def fn(path):
      path.mkdir()
      (path / 'f').write_text(text)
    return fn
  folder = tmp_path / 'controlnet'
  atomic.replace_folder(folder, write('one'))
  atomic.replace_folder(folder, write('two'))
  assert (folder / 'f').read_text() == 'two' and sorted(p.name for p in tmp_path.iterdir()) == [
      'controlnet']

  def killed(path):  # A write that dies half way: the old copy stays in place.
    path.mkdir()
    raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    atomic.replace_folder(folder, killed)
  assert (folder / 'f').read_text() == 'two'
  # Killed between the renames: only FOLDER.old is whole; the next write starts from it.
  folder.rename(tmp_path / 'controlnet.old')
  atomic.replace_folder(folder, write('three'))
  assert (folder / 'f').read_text() == 'three' and sorted(p.name for p in tmp_path.iterdir()) == [
      'controlnet']


def test_settings_the_base_prescribes_name_a_different_user_value(caplog):
  """A pipeline's scheduler sets sample.spacing / sample.clip_x0: a user's other value is
  named in a warning, not replaced silently; the default is replaced quietly."""
  config = finetune_lora.get_config()
  with caplog.at_level(logging.WARNING):
    base_lib.impose(config, 'sample.spacing', config.sample.spacing, "the pipeline's scheduler")
  assert caplog.text == ''
  config.sample.spacing = 'trailing'
  with caplog.at_level(logging.WARNING):
    base_lib.impose(config, 'sample.spacing', 'leading', "the pipeline's scheduler")
  assert config.sample.spacing == 'leading'
  assert "sample.spacing='trailing' is replaced by 'leading'" in caplog.text
