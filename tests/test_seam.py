"""The training seam: parameter rules (frozen, lr multipliers, decay masks), gradient
accumulation, rematerialisation, and the state's layout over (data, fsdp) meshes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import errors, mesh as mesh_lib, optim, params as params_lib
from ddpm import train
from test_ddpm_train import tiny_config

REPO = Path(__file__).resolve().parents[1]


def one_step(config, batch=None):
  """(state before, state after, metrics) of one ddpm train step on a digits batch."""
  from common import data  # pylint: disable=g-import-not-at-top
  model, schedule, tx = train.build_model(config), train.build_schedule(config), train.make_optimizer(config)
  mesh = mesh_lib.make_mesh()
  state = train.create_train_state(config, model, tx, mesh)
  before = jax.device_get(state)
  if batch is None:
    batch = next(data.BatchIterator(data.load_dataset(config.data), 16, seed=0))
  step = train.make_train_step(config, model, schedule, tx, mesh)
  after, metrics = step(state, mesh_lib.shard_batch(batch, mesh))
  return before, jax.device_get(after), jax.device_get(metrics)


def flat_params(tree):
  return {params_lib.path_str(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def nbytes(tree):
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def adam_config():
  config = tiny_config()
  config.optim.warmup_steps = 0  # lr > 0 at the first step.
  return config


# --- Rules -------------------------------------------------------------------------------------

def test_frozen_parameters_are_bit_identical_and_have_no_optimizer_state():
  config = adam_config()
  config.params.trainable = (('conv_out/.*', True), ('.*', False))
  before, after, metrics = one_step(config)
  old, new = flat_params(before.params), flat_params(after.params)
  trained = [k for k in old if k.startswith('conv_out/')]
  assert trained == ['conv_out/bias', 'conv_out/kernel']
  for k in old:
    if k in trained:
      assert not np.array_equal(old[k], new[k]), k
    else:
      np.testing.assert_array_equal(old[k], new[k], err_msg=k)
  # Adam's state and the EMA cover the trainable subtree only.
  assert set(flat_params(after.ema_params)) == set(trained)
  full = jax.eval_shape(lambda: train.init_state(adam_config(), train.build_model(config),
                                                 train.make_optimizer(adam_config())))
  fraction = sum(old[k].size for k in trained) / sum(v.size for v in old.values())
  ratio = nbytes(after.opt_state) / sum(np.prod(x.shape) * x.dtype.itemsize
                                        for x in jax.tree.leaves(full.opt_state))
  assert fraction < 0.01 and abs(ratio - fraction) < 0.1 * fraction, (ratio, fraction)
  assert np.isfinite(metrics['loss'])


@pytest.mark.slow  # Two step compilations (~15-30 s): CI's slow tier runs it.
def test_lr_multiplier_scales_that_group_update_only():
  config = adam_config()
  base_before, base, _ = one_step(config)
  config.params.lr_multipliers = (('conv_in/.*', 0.5), ('time_embedding/.*', 0.0))
  _, scaled, _ = one_step(config)
  b0, b1, s1 = flat_params(base_before.params), flat_params(base.params), flat_params(scaled.params)
  for k in b0:
    delta, delta_scaled = b1[k] - b0[k], s1[k] - b0[k]
    factor = 0.5 if k.startswith('conv_in/') else 0.0 if k.startswith('time_embedding/') else 1.0
    # atol: the deltas are differences of float32 parameters (one ulp of 0.1-sized weights).
    np.testing.assert_allclose(delta_scaled, factor * delta, rtol=1e-5, atol=5e-8, err_msg=k)


def test_weight_decay_mask_spares_biases_and_norm_scales():
  c = optim.get_config()
  c.name, c.weight_decay, c.warmup_steps, c.grad_clip_norm = 'adamw', 0.1, 0, 0.0
  tx = optim.make_optimizer(c, 10, params_lib.Rules())
  params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
            'norm': {'scale': jnp.ones(2)}}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates['dense']['kernel'], -c.learning_rate * 0.1, rtol=1e-6)
  assert not np.any(updates['dense']['bias']) and not np.any(updates['norm']['scale'])


@pytest.mark.parametrize('key,rules,message', [
    ('trainable', (('no_such_module/.*', True),), r"params.trainable\[0\]='no_such_module/\.\*' match"),
    ('lr_multipliers', (('conv_in/.*', 'fast'),), r'params.lr_multipliers\[0\].*must be a number'),
    ('sharding', (('conv_in/.*', 'diagonal'),), r"params.sharding\[0\]='diagonal' is not one of"),
    ('trainable', (('conv_in/(', True),), r'params.trainable\[0\].*not a regular expression'),
    ('trainable', (('.*', False),), r'freezes every parameter'),
    ('trainable', (('(conv_in|conv_zz)/.*', True), ('.*', False)),
     r"params.trainable\[0\]='\(conv_in\|conv_zz\)/\.\*': its alternative 'conv_zz' match"),
])
def test_bad_rules_are_config_errors_before_any_compute(tmp_path, key, rules, message):
  config = tiny_config()
  config.params[key] = rules
  with pytest.raises(errors.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists() and not (tmp_path / 'config.json').exists()


def test_an_alternative_matching_nothing_is_named_but_the_shipped_default_is_exempt():
  params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}}  # No norm scales.
  params_lib.Rules().check({'net': params})  # The default '.*(bias|scale)': every model.
  c = params_lib.get_config()
  c.weight_decay = (('.*(bias|scale)', False),)
  c.lr_multipliers = (('(dense|dense_9)/(kernel|bias)', 0.5),)
  with pytest.raises(errors.ConfigError, match=(
      r"params.lr_multipliers\[0\]='\(dense\|dense_9\)/\(kernel\|bias\)': its alternative "
      r"'dense_9' match")):
    params_lib.Rules(c).check({'net': params})
  c.lr_multipliers = ()
  c.weight_decay = (('.*(bias|norm_scale)', False),)  # The user's rule: checked.
  with pytest.raises(errors.ConfigError, match=r"its alternative 'norm_scale' match"):
    params_lib.Rules(c).check({'net': params})


def test_trainable_table_is_logged(tmp_path, caplog):
  config = tiny_config()
  config.train.num_steps = 2
  config.params.trainable = (('down_blocks_1/.*', True), ('.*', False))
  with caplog.at_level('INFO'):
    train.train_and_evaluate(config, str(tmp_path))
  text = caplog.text
  assert 'Trainable' in text and 'frozen' in text
  table = text[text.index('module'):]
  assert 'down_blocks_1' in table and 'conv_in' in table and 'total' in table


# --- Gradient accumulation and rematerialisation ----------------------------------------------

@pytest.mark.parametrize('dropout', [0.0, 0.5])
def test_gradient_accumulation_gives_the_big_batch_update(dropout):
  """4 micro-batches of 4 are the update of one batch of 16, with dropout on too: its masks
  are drawn per example (optim.value_and_grad's rng)."""
  config = adam_config()
  config.optim.eps = 1e-4  # See tests/_layouts.py: keeps Adam from amplifying rounding noise.
  config.model.dropout = dropout
  _, big, m_big = one_step(config)
  config.train.grad_accum_steps = 4
  _, accumulated, m_acc = one_step(config)
  np.testing.assert_allclose(m_acc['loss'], m_big['loss'], rtol=1e-5)
  np.testing.assert_allclose(m_acc['grad_norm'], m_big['grad_norm'], rtol=1e-5)
  for k, v in flat_params(big.params).items():
    np.testing.assert_allclose(flat_params(accumulated.params)[k], v, rtol=1e-5, atol=1e-7,
                               err_msg=k)
  if dropout:
    config.model.dropout, config.train.grad_accum_steps = 0.0, 1
    _, _, m_plain = one_step(config)
    assert abs(m_plain['loss'] - m_big['loss']) > 1e-3 * m_plain['loss']  # Dropout was on.


def test_dropout_masks_are_per_example_in_every_micro_batch():
  """Through the gradient of sum(dropout(w[row])) w.r.t. w, row i of the gradient is example
  i's mask: every example has its own, and k micro-batches draw those of the whole batch."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  b, d, rate = 16, 64, 0.5
  drop = nn.Dropout(rate, deterministic=False)
  params, batch = {'w': jnp.ones((b, d))}, {'row': jnp.arange(b)}
  key, rules = jax.random.PRNGKey(3), params_lib.Rules()

  def loss_fn(p, mb, rng):
    return jnp.mean(jnp.sum(drop.apply({}, p['w'][mb['row']], rngs={'dropout': rng}), -1)), {}

  def masks(k, **kwargs):
    (_, _), grads = jax.jit(lambda p: optim.value_and_grad(
        kwargs.get('fn', loss_fn), p, rules, batch, k, **kwargs.get('rng', {'rng': key})))(params)
    m = np.asarray(grads['w']) * b * (1 - rate)
    np.testing.assert_allclose(m, np.round(m), atol=1e-5)  # 0/1: one mask per row.
    return np.round(m)

  whole = masks(1)
  assert 0.3 < whole.mean() < 0.7
  assert len({tuple(r) for r in whole}) == b  # Every example its own mask.
  for k in (2, 4, 8):
    np.testing.assert_array_equal(masks(k), whole, err_msg=f'{k} micro-batches')
  # Without the rule (the key closed over, one mask per call: what the step did before),
  # micro-batches repeat one another's masks: row j and row j + 1 of 4 micro-batches of 4.
  closed = masks(4, fn=lambda p, mb: loss_fn(p, mb, key), rng={})
  np.testing.assert_array_equal(closed[0], closed[1])
  assert not np.array_equal(closed, whole)


def _primitive_counts(jaxpr, counts=None) -> dict:
  """{primitive name: uses} in a jaxpr and every jaxpr nested in its equations' parameters."""
  from jax.extend import core as jcore  # pylint: disable=g-import-not-at-top
  counts = {} if counts is None else counts
  for eqn in jaxpr.eqns:
    counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(sub, (jcore.ClosedJaxpr, jcore.Jaxpr)):
          _primitive_counts(getattr(sub, 'jaxpr', sub), counts)
  return counts


def _step_program(config):
  """(jitted ddpm train step, abstract state, abstract batch)."""
  import functools  # pylint: disable=g-import-not-at-top
  model, schedule, tx = train.build_model(config), train.build_schedule(config), train.make_optimizer(config)
  state = jax.eval_shape(functools.partial(train.init_state, config, model, tx))
  batch = jax.ShapeDtypeStruct((config.train.batch_size, 16, 16, 3), jnp.uint8)
  step = jax.jit(functools.partial(train.train_step, config=config, model=model,
                                   schedule=schedule, tx=tx, rules=train.rules_of(config)))
  return step, state, batch


REMAT_PRIMITIVES = ('checkpoint', 'remat', 'remat2')  # jax.checkpoint's name over versions.


def test_remat_puts_checkpointed_blocks_in_the_step():
  """model.remat=True: each resnet/attention block of the U-Net is a jax.checkpoint in the
  step's program (absent with remat off)."""
  config = adam_config()
  counts = {}
  for remat in (False, True):
    config.model.remat = remat
    step, state, batch = _step_program(config)
    found = _primitive_counts(jax.make_jaxpr(step)(state, batch).jaxpr)
    counts[remat] = sum(found.get(name, 0) for name in REMAT_PRIMITIVES)
  # tiny_config: 2 levels of 1 resnet down and 2 up, attention at 8x8, the mid block: 12.
  assert counts == {False: 0, True: 12}, counts


@pytest.mark.slow  # Two step compilations (~15-30 s): CI's slow tier runs it.
def test_remat_changes_memory_not_results():
  config = adam_config()
  config.optim.eps = 1e-4
  _, plain, m_plain = one_step(config)
  config.model.remat = True
  _, remat, m_remat = one_step(config)
  assert set(flat_params(plain.params)) == set(flat_params(remat.params))  # Same names.
  np.testing.assert_allclose(m_remat['loss'], m_plain['loss'], rtol=1e-6)
  for k, v in flat_params(plain.params).items():
    np.testing.assert_allclose(flat_params(remat.params)[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
  # The compiled program recomputes the blocks' forward in the backward pass: XLA kept the
  # checkpoints (measured: 74 -> 82 convolutions, 101 -> 129 dots on CPU).
  ops = {}
  for remat in (False, True):
    config.model.remat = remat
    step, state, batch = _step_program(config)
    text = step.lower(state, batch).compile().as_text()
    ops[remat] = (text.count(' convolution('), text.count(' dot('))
  assert ops[True][0] > ops[False][0] and ops[True][1] > ops[False][1], ops


def test_fsdp_spec_picks_the_largest_divisible_dimension():
  mesh = mesh_lib.make_mesh(None, jax.devices()[:1])
  assert mesh_lib.fsdp_spec((3, 3, 64, 128), mesh) == jax.sharding.PartitionSpec()  # fsdp=1.
  fake = type('M', (), {'shape': {'data': 1, 'fsdp': 8}})()
  P = jax.sharding.PartitionSpec
  assert mesh_lib.fsdp_spec((3, 3, 64, 128), fake) == P(None, None, None, 'fsdp')
  assert mesh_lib.fsdp_spec((3, 3, 64, 12), fake) == P(None, None, 'fsdp')
  assert mesh_lib.fsdp_spec((3,), fake) == P()
  assert mesh_lib.fsdp_spec((3, 3, 64, 128), fake, min_size=10**6) == P()
  assert mesh_lib.fsdp_spec((64, 128), fake, 'replicated') == P()


# --- Layouts on 8 fake devices (slow: every layout compiles its own partitioned program) -------

@pytest.mark.slow
def test_layouts_agree_shard_memory_and_restore_across_each_other():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run([sys.executable, str(REPO / 'tests' / '_layouts.py')], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
  line = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
  assert out.returncode == 0 and line, out.stderr[-4000:]
  report = json.loads(line[0][len('RESULT '):])
  for model in ('ddpm', 'ldm'):
    for layout, r in report[model].items():
      assert r['loss_rel'] < 1e-5 and r['params_close'], (model, layout, r)
  b = report['state_bytes']
  assert b['data=8'] == b['1 device']                    # Data parallel: a full copy each.
  assert b['fsdp=8'] < 0.13 * b['1 device'], b           # Measured 0.125.
  assert b['data=2 fsdp=4'] < 0.26 * b['1 device'], b
  assert all(report['restore'].values()), report['restore']
