"""Network pieces shared by ddpm/ and latent/, written for XLA's fast paths.

Each is here because of a measured cost on CPU (benchmarks/profile_step.py found them;
the figures are in benchmarks/RESULTS.md, "latent" and "ddpm"):

- `dot_product_attention` works in the [B, heads, L, d] layout, where XLA's
  batched matmuls run as library calls (in [B, L, heads, d] they did not: the
  forward of a 256-token self-attention took 7x longer), and has a hand-written
  backward pass that reduces over [B, heads, Lq, d] instead of the [.., Lq, Lk]
  softmax (FlashAttention's D = rowsum(dO * O) trick, without the tiling); without
  gradients it normalises the output rather than the weights, and long sequences run
  in blocks of queries whose logits stay in cache (4096 tokens: 3x faster).
- `dense` applies its kernel to the inputs flattened to [N, features_in], so the
  kernel's gradient is one plain matmul rather than a contraction over several
  batch axes.
- `gelu` is the exact GELU in PyTorch's erf form.
- `GroupNorm` takes its statistics from per-channel sums over the pixels of
  [B, pixels, C], which XLA reduces at memory speed; nn.GroupNorm reduces over
  (pixels, channels of the group) at once, 4x slower (forward + backward at
  16x32x32x128: 11.5 -> 5.9 ms; PyTorch 5.6).
- `per_example_dropout` draws every nn.Dropout mask per example, from the example's
  row in the whole batch, with the model still run on the batch (vmapping the loss over
  examples instead made the ddpm step 1.3-1.8x slower on CPU), so gradient accumulation's
  micro-batches draw the masks of the whole batch (common.optim.value_and_grad).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def dot_product_attention(q, k, v, mask=None):
  """softmax(q k^T / sqrt(d)) v over [B, L, heads, d] -> [B, Lq, heads, d].

  `mask` (True = attend) is [B, Lk] (padding of the keys) or anything broadcastable
  to [B, heads, Lq, Lk] (a causal mask). Logits and softmax are float32 even under
  bfloat16 compute (diffusers' upcast_softmax).
  """
  if mask is not None and mask.ndim == 2:
    mask = mask[:, None, None, :]
  heads_first = lambda a: jnp.swapaxes(a, 1, 2)
  out = _attention(heads_first(q), heads_first(k), heads_first(v), mask)
  return heads_first(out)


def _softmax_parts(q, k, mask):
  """e = exp(logits - rowmax) (float32) and its row sums: softmax = e / sums."""
  logits = jnp.einsum('bhqd,bhkd->bhqk', q * (1 / math.sqrt(q.shape[-1])), k,
                      preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  return e, jnp.sum(e, axis=-1, keepdims=True)


# Without gradients, attention with more logits per head than this runs in blocks of
# _QUERY_BLOCK queries, one (batch, head) at a time (`_attention_in_blocks`). Measured on one
# core: 256x256 and 1024x77 logits per head are faster whole (their float32 logits fit in
# a core's L2 cache), 320x320 (2.5x) and 4096x77 (1.9x) faster in blocks.
_BLOCKS_ABOVE = 96 * 1024
_QUERY_BLOCK = 128


def _attention_unnormalised(q, k, v, mask):
  # The weights stay unnormalised: scaling the [.., Lq, d] output by the row sums instead of
  # the [.., Lq, Lk] weights saves a pass over the largest tensor (the forward 1.3-2.8x
  # faster, RESULTS.md "pipelines").
  e, sums = _softmax_parts(q, k, mask)
  out = jnp.einsum('bhqk,bhkd->bhqd', e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out * (1 / sums)).astype(v.dtype)


def _attention_in_blocks(q, k, v, mask):
  """`_attention_unnormalised` over blocks of queries of one (batch, head) in turn.

  Each block's [_QUERY_BLOCK, Lk] logits stay in the core's cache through the max, the
  exponential and the second matmul, where the whole [B, heads, Lq, Lk] tensor (1 GB at
  SD's 64x64 level, batch 2) goes through memory four times: 4096 tokens 3.1x faster on one
  core, 1024 tokens 3.6x (RESULTS.md "pipelines"). A key mask must not vary over the
  queries ([.., 1, Lk]).

  The loop runs over batch x heads: keeping the batch inside each block (a vmap of the
  loop) was 1.3-1.7x slower. Under a mesh that shards the batch, XLA gathers q, k and v
  and each device runs the whole loop (at 4096 tokens, batch 2, one core: 474 ms, where half
  of the whole matrix would take about 725).
  """
  b, h, lq, d = q.shape
  lk = k.shape[2]
  blocks = -(-lq // _QUERY_BLOCK)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, blocks * _QUERY_BLOCK - lq), (0, 0)))
  q = q.reshape(b * h, blocks, 1, 1, _QUERY_BLOCK, d)
  k, v = k.reshape(b * h, 1, 1, lk, d), v.reshape(b * h, 1, 1, lk, -1)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, h, 1, lk)).reshape(b * h, 1, 1, 1, lk)

  def one_head(args):
    q_blocks, k, v, mask = args
    return jax.lax.map(lambda q: _attention_unnormalised(q, k, v, mask), q_blocks)

  out = jax.lax.map(one_head, (q, k, v, mask))  # [B * heads, blocks, 1, 1, block, d]
  return out.reshape(b, h, blocks * _QUERY_BLOCK, -1)[:, :, :lq]


@jax.custom_vjp
def _attention(q, k, v, mask):
  # Without gradients. Blocks on CPU only: on a GPU or TPU the loop's hundreds of small
  # steps would cost more than the memory traffic they save. With gradients `_attention_fwd`
  # keeps the normalised weights, with which the backward runs faster (256 tokens: 33 vs
  # 50 ms).
  same_for_all_queries = mask is None or mask.ndim < 2 or mask.shape[-2] == 1
  if (q.shape[2] * k.shape[2] > _BLOCKS_ABOVE and same_for_all_queries
      and jax.default_backend() == 'cpu'):
    return _attention_in_blocks(q, k, v, mask)
  return _attention_unnormalised(q, k, v, mask)


def _attention_fwd(q, k, v, mask):
  e, sums = _softmax_parts(q, k, mask)
  p = e * (1 / sums)
  out = jnp.einsum('bhqk,bhkd->bhqd', p.astype(v.dtype), v)
  return out, (q, k, v, mask, p, out)


def _attention_bwd(residuals, d_out):
  q, k, v, mask, p, out = residuals
  scale = 1 / math.sqrt(q.shape[-1])
  d_v = jnp.einsum('bhqk,bhqd->bhkd', p.astype(v.dtype), d_out)
  d_p = jnp.einsum('bhqd,bhkd->bhqk', d_out, v, preferred_element_type=jnp.float32)
  # softmax's backward: dS = P (dP - rowsum(dP P)), and rowsum(dP P) = rowsum(dO O).
  rowsum = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = (p * (d_p - rowsum)).astype(q.dtype)
  d_q = jnp.einsum('bhqk,bhkd->bhqd', d_logits, k) * scale
  d_k = jnp.einsum('bhqk,bhqd->bhkd', d_logits, q) * scale
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def gelu(x):
  """Exact GELU, x Phi(x), written with erf as PyTorch does: XLA's erf is one polynomial,
  where jax.nn.gelu(approximate=False) goes through erfc (exponentials and selects)."""
  return 0.5 * x * (1 + jax.lax.erf(x * (1 / math.sqrt(2))))


def dense(x, features: int, **kwargs):
  """nn.Dense(features, **kwargs)(x) over the last axis, computed on x flattened to 2-D.

  Same parameters and outputs; call it inside a compact method (the layer is a child of
  the calling module). A plain nn.Dense, so LoRA's and hypernetworks' interceptors see
  it, once.
  """
  y = nn.Dense(features, **kwargs)(x.reshape(-1, x.shape[-1]))
  return y.reshape(*x.shape[:-1], features)


class GroupNorm(nn.Module):
  """nn.GroupNorm over channels-last inputs [B, ..., C]: the same 'scale' and 'bias'
  parameters and the same statistics (float32, var = E[x^2] - E[x]^2 as flax's default),
  computed from per-channel sums over the pixels (see the module docstring)."""
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'GroupNorm: {c} channels do not split into {self.num_groups} groups.')
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    b, g = x.shape[0], self.num_groups
    x32 = x.astype(jnp.float32).reshape(b, -1, c)
    per_group = lambda s: s.reshape(b, g, c // g).sum(-1) / (x32.shape[1] * (c // g))
    mean = per_group(x32.sum(1))
    var = jnp.maximum(per_group(jnp.square(x32).sum(1)) - jnp.square(mean), 0.0)
    per_channel = lambda s: jnp.repeat(s, c // g, axis=-1)[:, None]  # [B, 1, C]
    mul = per_channel(jax.lax.rsqrt(var + self.epsilon)) * scale
    y = x32 * mul + (bias - per_channel(mean) * mul)
    return y.reshape(x.shape).astype(self.dtype or jnp.result_type(x, jnp.float32))


@contextlib.contextmanager
def per_example_dropout(rows):
  """Within it, each nn.Dropout applied to [b, ...] inputs draws example j's mask from
  fold_in(the layer's key, rows[j]): `rows` [b] are the examples' rows in the whole batch.

  The layer's key is the one nn.Dropout would use (make_rng of its rng collection, or its
  `rng` argument), so the masks depend on the layer, the key the model was given and the
  row, not on which other examples share the call: a micro-batch of rows (j, j+k, ...)
  draws exactly the masks those rows get in the whole batch. A mask broadcast over the
  batch (0 in broadcast_dims) stays one draw for all.
  """
  rows = jnp.asarray(rows)

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if not isinstance(module, nn.Dropout) or context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    names = ('inputs', 'deterministic', 'rng')
    call = {**dict(zip(names, args)), **kwargs}
    x = call['inputs']
    deterministic = nn.merge_param('deterministic', module.deterministic,
                                   call.get('deterministic'))
    shared = {d % x.ndim for d in module.broadcast_dims} if x.ndim else set()
    if deterministic or module.rate == 0.0 or module.rate == 1.0 or 0 in shared:
      return next_fun(*args, **kwargs)
    if x.ndim == 0 or x.shape[0] != rows.shape[0]:
      raise ValueError(f'per_example_dropout: {module.name or "a Dropout"} gets inputs of shape '
                       f'{x.shape}, not [{rows.shape[0]}, ...] (one row per example).')
    key = call.get('rng')
    if key is None:
      key = module.make_rng(module.rng_collection)
    keep = 1.0 - module.rate
    shape = [1 if d in shared else n for d, n in enumerate(x.shape)][1:]
    mask = jax.vmap(lambda r: jax.random.bernoulli(jax.random.fold_in(key, r), keep, shape))(rows)
    mask = jnp.broadcast_to(mask, x.shape)
    return jax.lax.select(mask, x / keep, jnp.zeros_like(x))

  with nn.intercept_methods(intercept):
    yield
