"""common.layers against PyTorch: attention (values and gradients, with masks), GELU, Dense,
GroupNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from common import layers

B, L, LK, H, D = 2, 24, 9, 3, 16


def _mask(kind):
  rng = np.random.RandomState(1)
  if kind == 'padding':  # [B, Lk], each row keeps at least its first key.
    mask = rng.rand(B, LK) > 0.4
    mask[:, 0] = True
    return mask
  if kind == 'causal':   # [B, 1, Lq, Lk] as CLIP builds it, with padding of the keys.
    pad = np.ones((B, LK), bool)
    pad[1, 6:] = False
    return np.tril(np.ones((L, LK), bool))[None, None] & pad[:, None, None, :]
  return None


@pytest.mark.parametrize('kind', [None, 'padding', 'causal'])
def test_attention_matches_torch_sdpa(kind):
  rng = np.random.RandomState(0)
  q, k, v = (rng.randn(*s).astype(np.float32) for s in ((B, L, H, D), (B, LK, H, D), (B, LK, H, D)))
  d_out = rng.randn(B, L, H, D).astype(np.float32)
  mask = _mask(kind)
  out, vjp = jax.vjp(lambda q, k, v: layers.dot_product_attention(
      q, k, v, None if mask is None else jnp.asarray(mask)), q, k, v)
  grads = vjp(jnp.asarray(d_out))

  tq, tk, tv = (torch.tensor(a.transpose(0, 2, 1, 3), requires_grad=True) for a in (q, k, v))
  tmask = None if mask is None else torch.tensor(mask if mask.ndim == 4 else mask[:, None, None])
  ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)
  ref.backward(torch.tensor(d_out.transpose(0, 2, 1, 3)))
  to_ours = lambda t: t.detach().numpy().transpose(0, 2, 1, 3)
  np.testing.assert_allclose(out, to_ours(ref), atol=2e-6, rtol=1e-5)
  for ours, theirs in zip(grads, (tq.grad, tk.grad, tv.grad)):
    np.testing.assert_allclose(ours, to_ours(theirs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('kind', [None, 'padding', 'causal'])
def test_attention_in_blocks_matches_torch_sdpa(kind, monkeypatch):
  """Without gradients, long sequences run in blocks of queries (forced here with a small
  threshold; 24 queries in blocks of 7, the last one padded); a causal mask, which varies
  over the queries, takes the whole-matrix path. Same values as PyTorch either way."""
  monkeypatch.setattr(layers, '_BLOCKS_ABOVE', 0)
  monkeypatch.setattr(layers, '_QUERY_BLOCK', 7)
  rng = np.random.RandomState(3)
  q, k, v = (rng.randn(*s).astype(np.float32) for s in ((B, L, H, D), (B, LK, H, D), (B, LK, H, D)))
  mask = _mask(kind)
  attend = jax.jit(lambda q, k, v, m: layers.dot_product_attention(q, k, v, m))
  out = attend(q, k, v, None if mask is None else jnp.asarray(mask))
  hlo = attend.lower(q, k, v, None if mask is None else jnp.asarray(mask)).as_text()
  assert ('while' in hlo) == (kind != 'causal')

  tq, tk, tv = (torch.tensor(a.transpose(0, 2, 1, 3)) for a in (q, k, v))
  tmask = None if mask is None else torch.tensor(mask if mask.ndim == 4 else mask[:, None, None])
  ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)
  np.testing.assert_allclose(out, ref.numpy().transpose(0, 2, 1, 3), atol=2e-6, rtol=1e-5)


def test_attention_in_bfloat16_follows_float32():
  """bfloat16 inputs keep float32 logits and softmax: outputs and gradients near float32's."""
  rng = np.random.RandomState(2)
  q, k, v = (jnp.asarray(rng.randn(B, L, H, D), jnp.float32) for _ in range(3))
  loss = lambda q, k, v: jnp.sum(jnp.sin(layers.dot_product_attention(q, k, v).astype(jnp.float32)))
  value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
  value16, grads16 = jax.value_and_grad(loss, argnums=(0, 1, 2))(
      *(a.astype(jnp.bfloat16) for a in (q, k, v)))
  assert all(g.dtype == jnp.bfloat16 for g in grads16)
  assert abs(float(value16) - float(value)) < 0.05 * abs(float(value)) + 0.5
  for g, g16 in zip(grads, grads16):
    assert float(jnp.linalg.norm(g16.astype(jnp.float32) - g) / jnp.linalg.norm(g)) < 0.03


def test_gelu_matches_torch():
  x = np.linspace(-8, 8, 4001, dtype=np.float32)
  np.testing.assert_allclose(layers.gelu(jnp.asarray(x)),
                             torch.nn.functional.gelu(torch.tensor(x)).numpy(), atol=2e-6)


def test_dense_is_nn_dense_on_any_rank():
  class Both(nn.Module):

    @nn.compact
    def __call__(self, x):
      return layers.dense(x, 7, name='flat'), nn.Dense(7, name='plain')(x)

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 5))
  params = Both().init(jax.random.PRNGKey(1), x)['params']
  assert jax.tree.map(jnp.shape, params['flat']) == jax.tree.map(jnp.shape, params['plain'])
  params = {'flat': params['plain'], 'plain': params['plain']}
  flat, plain = Both().apply({'params': params}, x)
  assert flat.shape == (2, 3, 4, 7)
  np.testing.assert_allclose(flat, plain, atol=1e-6)


@pytest.mark.parametrize('shape,groups', [((2, 6, 5, 32), 8), ((2, 7, 64), 32)])
def test_group_norm_matches_torch_and_flax(shape, groups):
  """Values and gradients (input, scale, bias) against torch.nn.GroupNorm in float64; the
  same parameter tree as nn.GroupNorm, and its outputs."""
  rng = np.random.RandomState(3)
  x = (rng.randn(*shape) * 2 + 1.5).astype(np.float32)  # An offset mean: E[x^2] - E[x]^2.
  d_out = rng.randn(*shape).astype(np.float32)
  norm = layers.GroupNorm(groups, epsilon=1e-5)
  params = norm.init(jax.random.PRNGKey(0), x)['params']
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, nn.GroupNorm(groups).init(jax.random.PRNGKey(0), x)['params'])
  params = {'scale': jnp.asarray(rng.rand(shape[-1]) + 0.5, jnp.float32),
            'bias': jnp.asarray(rng.randn(shape[-1]), jnp.float32)}
  out, vjp = jax.vjp(lambda p, x: norm.apply({'params': p}, x), params, jnp.asarray(x))
  d_params, d_x = vjp(jnp.asarray(d_out))
  np.testing.assert_allclose(
      out, nn.GroupNorm(groups, epsilon=1e-5).apply({'params': params}, x), atol=2e-5)

  channels_first = lambda a: np.moveaxis(a, -1, 1).astype(np.float64)
  tx = torch.tensor(channels_first(x), requires_grad=True)
  ref = torch.nn.GroupNorm(groups, shape[-1], eps=1e-5).double()
  with torch.no_grad():
    ref.weight.copy_(torch.tensor(np.asarray(params['scale'], np.float64)))
    ref.bias.copy_(torch.tensor(np.asarray(params['bias'], np.float64)))
  y = ref(tx)
  y.backward(torch.tensor(channels_first(d_out)))
  channels_last = lambda t: np.moveaxis(t.detach().numpy(), 1, -1)
  np.testing.assert_allclose(out, channels_last(y), atol=2e-5)
  np.testing.assert_allclose(d_x, channels_last(tx.grad), atol=5e-5)
  np.testing.assert_allclose(d_params['scale'], ref.weight.grad.numpy(), atol=2e-4, rtol=1e-5)
  np.testing.assert_allclose(d_params['bias'], ref.bias.grad.numpy(), atol=2e-4, rtol=1e-5)


def test_group_norm_keeps_flax_dtypes():
  x = jnp.ones((1, 4, 4, 8), jnp.bfloat16)
  params = {'scale': jnp.ones(8), 'bias': jnp.zeros(8)}
  assert layers.GroupNorm(4, dtype=jnp.bfloat16).apply({'params': params}, x).dtype == jnp.bfloat16
  assert layers.GroupNorm(4).apply({'params': params}, x).dtype == jnp.float32
