"""LoRA (common.lora) on the pixel U-Net: exact no-op at init, merge = two-branch forward,
several adapters at their own strengths, PEFT parity on diffusers' UNet2DModel, training
through the parameter rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import flax.traverse_util

from common import data, lora, params as params_lib
from ddpm import convert, models, train
from test_ddpm_train import tiny_config
from test_ddpm_unet import TINY, random_pair

# Attention projections and the resnets' first convolutions (LoRA on convs too).
TARGETS = r'.*/(to_q|to_k|to_v|to_out_0|conv1)'


@pytest.fixture(scope='module')
def unet_params():
  unet = models.UNet(**TINY)
  params = unet.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)))['params']
  return unet, params


def randomised(adapter_params, seed, std=0.05):
  """B is zero at init (the no-op); random B makes every adapter matter."""
  flat = flax.traverse_util.flatten_dict(adapter_params)
  rng = np.random.RandomState(seed)
  for k, v in flat.items():
    if k[-1] == lora.B:
      flat[k] = jnp.asarray(rng.normal(0, std, v.shape), jnp.float32)
  return flax.traverse_util.unflatten_dict(flat)


def inputs(seed=0):
  rng = np.random.RandomState(seed)
  return rng.randn(3, 16, 16, 3).astype(np.float32), np.array([0, 421, 999])


def test_adapter_is_an_exact_no_op_at_init(unet_params):
  unet, params = unet_params
  adapted = lora.add(params, jax.random.PRNGKey(1), rank=4, targets=TARGETS)
  x, t = inputs()
  base = unet.apply({'params': params}, x, t)
  with lora.enabled():
    two_branch = unet.apply({'params': adapted}, x, t)
  np.testing.assert_array_equal(np.asarray(two_branch), np.asarray(base))
  np.testing.assert_array_equal(np.asarray(unet.apply({'params': lora.merged(adapted)}, x, t)),
                                np.asarray(base))
  modules = {params_lib.path_str(k[:-1]) for k in flax.traverse_util.flatten_dict(adapted)
             if k[-1] == lora.A}
  assert 'mid_block/attentions_0/to_q' in modules and 'down_blocks_0/resnets_0/conv1' in modules


def test_a_target_alternative_that_matches_nothing_is_named(unet_params):
  from common import errors  # pylint: disable=g-import-not-at-top
  _, params = unet_params
  with pytest.raises(errors.ConfigError,
                     match=r"LoRA targets '\.\*/\(to_q\|to_zz\)': the alternative 'to_zz' "
                           r"matches no Dense or Conv module \(module paths look like"):
    lora.add(params, jax.random.PRNGKey(1), 4, targets=r'.*/(to_q|to_zz)')
  with pytest.raises(errors.ConfigError, match=r"alternatives 'to_zz', 'conv9' match no"):
    lora.add(params, jax.random.PRNGKey(1), 4, targets=r'.*/(to_q|to_zz|conv1|conv9)')
  with pytest.raises(errors.ConfigError, match=r"the alternative 'zz' matches no"):
    lora.add(params, jax.random.PRNGKey(1), 4, targets=r'.*/(to_(q|zz)|conv1)')
  lora.add(params, jax.random.PRNGKey(1), 4, targets=r'.*/(to_(q|k)|conv1)')  # All match.


def test_parameter_table_spells_paths_as_the_rules_and_targets_match_them(tmp_path):
  """A module named 'net_0.proj' (diffusers' ff.net.0.proj) is 'ff/net_0/proj' in the
  parameters_*.txt table, the spelling `params` rules and `lora.targets` match."""
  from common import logs  # pylint: disable=g-import-not-at-top
  params = {'blocks_0': {'ff': {'net_0.proj': {'kernel': jnp.zeros((8, 16)),
                                               'bias': jnp.zeros((16,))},
                                'net_2': {'kernel': jnp.zeros((16, 8))}}}}
  logs.log_parameter_overview(params, 'Tiny net', tmp_path)
  table = (tmp_path / 'parameters_tiny_net.txt').read_text()
  names = [line.split('|')[1].strip() for line in table.splitlines()
           if line.startswith('|') and 'Shape' not in line]
  assert names == ['blocks_0/ff/net_0/proj/bias', 'blocks_0/ff/net_0/proj/kernel',
                   'blocks_0/ff/net_2/kernel'], table
  assert 'net_0.proj' not in table
  # What the table shows is what a rule and a LoRA target are written against.
  strict = params_lib.get_config()
  strict.trainable = (('blocks_0/ff/net_0/proj/kernel', True), ('.*', False))
  params_lib.Rules(strict).check({'net': params})
  adapted = lora.add(params, jax.random.PRNGKey(0), 2, targets='blocks_0/ff/net_0/proj')
  assert lora.A in adapted['blocks_0']['ff']['net_0.proj']


def test_merged_weights_equal_the_two_branch_forward(unet_params):
  unet, params = unet_params
  adapted = randomised(lora.add(params, jax.random.PRNGKey(1), rank=4, alpha=8,
                                targets=TARGETS), 0)
  x, t = inputs(1)
  with lora.enabled():
    two_branch = np.asarray(unet.apply({'params': adapted}, x, t))
  merged = np.asarray(unet.apply({'params': lora.merged(adapted)}, x, t))
  base = np.asarray(unet.apply({'params': params}, x, t))
  assert np.abs(two_branch - base).max() > 1e-2  # The adapter changes the output ...
  np.testing.assert_allclose(merged, two_branch, atol=1e-6 * max(1.0, np.abs(base).max()))


def test_several_adapters_at_their_own_strengths(unet_params):
  _, params = unet_params
  _, first = lora.split(randomised(lora.add(params, jax.random.PRNGKey(1), 4, targets=TARGETS), 0))
  _, second = lora.split(randomised(lora.add(params, jax.random.PRNGKey(2), 2, alpha=4,
                                             targets=r'.*/to_v'), 1))
  merged = lora.merge_adapters(params, [(first, 0.8), (second, -0.5)])
  flat = lambda tree: flax.traverse_util.flatten_dict(tree)
  f1, f2, base, out = flat(first), flat(second), flat(params), flat(merged)
  for key, w in base.items():
    expected = np.asarray(w, np.float64)
    for adapter, strength in ((f1, 0.8), (f2, -0.5)):
      m = key[:-1]
      if key[-1] == 'kernel' and m + (lora.A,) in adapter:
        a, b = (np.asarray(adapter[m + (n,)], np.float64) for n in (lora.A, lora.B))
        expected = expected + strength * float(adapter[m + (lora.SCALE,)]) * np.tensordot(a, b, 1)
    np.testing.assert_allclose(out[key], expected, rtol=1e-6, atol=1e-7, err_msg=str(key))


def test_peft_state_dict_round_trip(unet_params):
  _, params = unet_params
  adapted = randomised(lora.add(params, jax.random.PRNGKey(1), rank=4, alpha=2, targets=TARGETS), 0)
  state = lora.to_peft(adapted)
  for k, b in flax.traverse_util.flatten_dict(adapted).items():
    if k[-1] == lora.B:  # B as trained, unscaled ([out, r], 1x1 for a conv).
      name = params_lib.torch_module_name(k[:-1])
      np.testing.assert_array_equal(state[f'{name}.lora_B.weight'].reshape(b.shape[::-1]),
                                    np.asarray(b).T, err_msg=name)
  alphas = lora.alphas(adapted)
  assert set(alphas.values()) == {2}
  back = lora.from_peft(state, params, alpha=alphas)
  # A, B and the scale come back as they were: B is never scaled on export.
  expected = lora.split(adapted)[1]
  assert jax.tree.structure(back) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), b)


def file_metadata(path):
  import json  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(str(path), framework='numpy') as f:
    metadata = f.metadata()
  return metadata, json.loads(metadata['lora_adapter_metadata'])


def test_export_matches_peft_on_diffusers_unet(tmp_path):
  """Our adapter (rank 4, alpha 8), saved as safetensors and injected into diffusers'
  UNet2DModel with PEFT under the LoraConfig its metadata records, gives that model our
  outputs: the file is a standard PEFT LoRA, B as trained and alpha as configured."""
  import peft  # pylint: disable=g-import-not-at-top
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  unet, reference, params = random_pair()
  adapted = randomised(lora.add(params, jax.random.PRNGKey(3), rank=4, alpha=8, targets=TARGETS), 2)
  path = lora.save(tmp_path / 'pytorch_lora_weights.safetensors', lora.split(adapted)[1])

  metadata, fields = file_metadata(path)
  assert fields['r'] == 4 and fields['lora_alpha'] == 8 and fields['alpha_pattern'] == {}
  assert metadata['ss_network_dim'] == '4' and metadata['ss_network_alpha'] == '8'
  saved = load_file(str(path))
  flat = flax.traverse_util.flatten_dict(adapted)
  trained_b = {params_lib.torch_module_name(k[:-1]): np.asarray(v) for k, v in flat.items()
               if k[-1] == lora.B}
  assert len(trained_b) == len(fields['target_modules']) > 0
  for name, b in trained_b.items():  # B unscaled: the trained B ([out, r], 1x1 for a conv).
    np.testing.assert_array_equal(
        saved[f'{name}.lora_B.weight'].numpy().reshape(b.shape[::-1]), b.T, err_msg=name)
  config = peft.LoraConfig(**{k: fields[k] for k in ('r', 'lora_alpha', 'target_modules',
                                                     'rank_pattern', 'alpha_pattern')})
  reference = peft.inject_adapter_in_model(config, reference)
  result = peft.set_peft_model_state_dict(reference, load_file(str(path)))
  assert not [k for k in result.missing_keys if 'lora' in k] and not result.unexpected_keys
  x, t = inputs(2)
  with torch.no_grad():
    theirs = reference(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t)).sample
  theirs = theirs.permute(0, 2, 3, 1).numpy()
  with lora.enabled():
    ours = np.asarray(unet.apply({'params': adapted}, x, t))
  base = np.asarray(unet.apply({'params': params}, x, t))
  assert np.abs(ours - base).max() > 1e-2 * np.abs(base).max()
  np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())


def test_training_moves_only_the_adapter():
  config = tiny_config()
  config.optim.warmup_steps = 0
  config.params.trainable = (('.*/lora_[AB]', True), ('.*', False))
  model, schedule = train.build_model(config), train.build_schedule(config)
  rules = train.rules_of(config)
  tx = train.make_optimizer(config, rules)
  base = train.init_state(config, model, tx).params  # Built before the rules see adapters.
  params = lora.add(base, jax.random.PRNGKey(5), rank=2)
  rules.check({'U-Net': params})
  state = train.new_state(params, tx, rules, jax.random.PRNGKey(6))
  step = jax.jit(lambda s, b: train.train_step(s, b, config=config, model=model,
                                               schedule=schedule, tx=tx, rules=rules))
  batch = next(data.BatchIterator(data.load_dataset(config.data), 16, seed=0))
  new, metrics = step(state, batch)
  before, after = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(
      jax.device_get(new.params))
  changed = {params_lib.path_str(k) for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all(p.endswith(('lora_A', 'lora_B')) for p in changed), changed
  assert any(p.endswith('lora_B') for p in changed)  # B leaves zero: the adapter now acts.
  # Adam state only for the adapter: 2 moments of each A and B.
  n_adapter = sum(v.size for k, v in before.items() if k[-1] in (lora.A, lora.B))
  n_state = sum(x.size for x in jax.tree.leaves(new.opt_state) if x.ndim)
  assert n_state == 2 * n_adapter
  assert np.isfinite(metrics['loss'])


def test_sampling_takes_adapter_files_at_a_strength(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from ddpm import sample  # pylint: disable=g-import-not-at-top
  from test_ddpm_train import write_tiny_config_file  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.train.num_steps = 2
  config.sample.num_images, config.sample.progressive = 4, False
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir))
  params = train.Experiment(config).sampling_params(workdir)
  adapter = lora.split(randomised(lora.add(params, jax.random.PRNGKey(1), 4), 0))[1]
  path = lora.save(tmp_path / 'lora.safetensors', adapter)
  images = []
  for i, specs in enumerate(((), (f'{path}:0',), (f'{path}:1.5',))):
    config.sample.adapters = specs
    config.sample.output_dir = str(tmp_path / f'out{i}')
    out = sample.generate(config, workdir)
    images.append(np.stack([np.asarray(Image.open(out / f'{k}.jpg')) for k in range(1, 5)]))
  np.testing.assert_array_equal(images[1], images[0])  # Strength 0: the base model.
  assert np.abs(images[2].astype(int) - images[0]).mean() > 1.0

  repo = Path(__file__).resolve().parents[1]
  proc = subprocess.run(
      [sys.executable, '-m', 'ddpm.main', f'--config={write_tiny_config_file(tmp_path)}',
       f'--workdir={workdir}', '--mode=sample', "--config.sample.adapters=('nowhere.safetensors:0.8',)"],
      cwd=repo, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'error: LoRA file nowhere.safetensors does not exist.' in proc.stderr
  assert 'Traceback' not in proc.stderr


# --- The conditional U-Net and diffusers' own LoRA loader ------------------------------------

def _conditional_pair():
  """Our ConditionalUNet with random weights, exported into diffusers' UNet2DConditionModel."""
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from latent.ldm import unet as unet_lib  # pylint: disable=g-import-not-at-top
  ours = unet_lib.ConditionalUNet(sample_size=8, in_channels=4, out_channels=4,
                                  block_out_channels=(16, 32), layers_per_block=1,
                                  attention_resolutions=(8,), head_dim=8, norm_groups=8)
  theirs = UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
      layers_per_block=1, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), norm_num_groups=8,
      cross_attention_dim=12, attention_head_dim=(2, 4), use_linear_projection=True).eval()
  rng = np.random.default_rng(0)
  z, t = rng.normal(size=(2, 8, 8, 4)).astype(np.float32), np.array([3, 777])
  context = rng.normal(size=(2, 5, 12)).astype(np.float32)
  params = ours.init(jax.random.PRNGKey(0), z, t, context=context)['params']
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.05, p.shape), jnp.float32), params)
  state = {k: torch.from_numpy(v) for k, v in convert.params_to_torch_state_dict(params).items()}
  theirs.load_state_dict(state, strict=True)  # Every key, every shape: the export is complete.

  def run_theirs():
    with torch.no_grad():
      out = theirs(torch.from_numpy(z.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                   encoder_hidden_states=torch.from_numpy(context)).sample
    return out.numpy().transpose(0, 2, 3, 1)

  def run_ours(p):
    with lora.enabled():
      return np.asarray(ours.apply({'params': p}, z, t, context=context))

  return params, theirs, run_ours, run_theirs


ATTENTION = r'.*/(attn1|attn2)/(to_q|to_k|to_v|to_out_0)'


def test_our_lora_file_loads_with_diffusers_loader(tmp_path):
  params, theirs, run_ours, run_theirs = _conditional_pair()
  np.testing.assert_allclose(run_ours(params), run_theirs(), atol=1e-4 * np.abs(run_theirs()).max())
  adapted = randomised(lora.add(params, jax.random.PRNGKey(1), rank=4, alpha=2, targets=ATTENTION), 3,
                       std=1.0)
  lora.save(tmp_path / 'pytorch_lora_weights.safetensors', lora.split(adapted)[1], prefix='unet.')
  theirs.load_lora_adapter(str(tmp_path), prefix='unet', weight_name='pytorch_lora_weights.safetensors')
  want, got = run_theirs(), run_ours(adapted)
  assert np.abs(got - run_ours(params)).max() > 1e-2 * np.abs(want).max()  # The adapter acts.
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_a_file_records_each_modules_alpha_and_loads_at_it_in_diffusers_and_ours(tmp_path):
  """Two alphas in one adapter (rank 4 alpha 8 on self-attention, rank 2 alpha 3 on
  cross-attention): the metadata's lora_alpha and alpha_pattern (and rank_pattern) record
  them, diffusers' loader applies them, and `load` gives back the very scales."""
  params, theirs, run_ours, run_theirs = _conditional_pair()
  adapted = lora.add(params, jax.random.PRNGKey(1), rank=4, alpha=8,
                     targets=r'.*/attn1/(to_q|to_k|to_v|to_out_0)')
  adapted = randomised(lora.add(adapted, jax.random.PRNGKey(2), rank=2, alpha=3,
                                targets=r'.*/attn2/(to_q|to_k|to_v|to_out_0)'), 4, std=1.0)
  path = lora.save(tmp_path / 'pytorch_lora_weights.safetensors', lora.split(adapted)[1],
                   prefix='unet.')
  _, fields = file_metadata(path)
  cross = {n for n in fields['unet.target_modules'] if '.attn2.' in n}
  assert 0 < 2 * len(cross) == len(fields['unet.target_modules'])
  assert fields['unet.r'] == 4 and fields['unet.lora_alpha'] == 8
  assert fields['unet.alpha_pattern'] == dict.fromkeys(cross, 3)
  assert fields['unet.rank_pattern'] == dict.fromkeys(cross, 2)

  loaded = lora.load(path, {'unet': params})['unet']
  want_tree = lora.split(adapted)[1]
  for a, b in zip(jax.tree.leaves(want_tree), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), b)
  theirs.load_lora_adapter(str(tmp_path), prefix='unet', weight_name=path.name)
  want, got = run_theirs(), run_ours(adapted)
  assert np.abs(got - run_ours(params)).max() > 1e-2 * np.abs(want).max()  # The adapter acts.
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_a_peft_lora_from_diffusers_loads_into_ours(tmp_path):
  import peft  # pylint: disable=g-import-not-at-top
  from peft.utils import get_peft_model_state_dict  # pylint: disable=g-import-not-at-top
  params, theirs, run_ours, run_theirs = _conditional_pair()
  theirs.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights='gaussian',
                                     target_modules=['to_q', 'to_k', 'to_v', 'to_out.0']))
  with torch.no_grad():
    for name, p in theirs.named_parameters():
      if 'lora_B' in name:
        p.normal_(0, 0.05)
  state = {k: v.numpy() for k, v in get_peft_model_state_dict(theirs).items()}
  adapter = lora.from_peft(state, params, alpha=8)
  want = run_theirs()
  got = run_ours(lora.merge_adapters(params, [(adapter, 1.0)]))
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
  # diffusers' own file of it: `load` takes alpha 8 from the metadata diffusers writes.
  theirs.save_lora_adapter(str(tmp_path), weight_name='theirs.safetensors')
  got = run_ours(lora.merge_adapters(params, [(lora.load(tmp_path / 'theirs.safetensors',
                                                         params), 1.0)]))
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize('edit,message', [
    ('rename', r'a\.safetensors: LoRA weights that \d+ name no layer of this model: unet\.down_blocks\.9'),
    ('reshape', r'1 do not fit its shapes: unet\.down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q'),
])
def test_mismatched_adapter_files_are_named(tmp_path, edit, message):
  from common import errors  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  params, _, _, _ = _conditional_pair()
  path = lora.save(tmp_path / 'a.safetensors',
                   lora.split(lora.add(params, jax.random.PRNGKey(1), 2, targets=ATTENTION))[1],
                   prefix='unet.')
  state = load_file(str(path))
  key = sorted(k for k in state if 'attn1.to_q.lora_B' in k)[0]
  if edit == 'rename':
    state = {k.replace('down_blocks.0', 'down_blocks.9'): v for k, v in state.items()}
  else:
    state[key] = np.zeros((5, state[key].shape[1]), np.float32)
  save_file(state, str(path))
  with pytest.raises(errors.ConfigError, match=message):
    lora.apply_files({'unet': params}, [str(path)])
