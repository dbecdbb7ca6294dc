"""Network pieces shared by ddpm/ and latent/, written for XLA's fast paths.

Each is here because of a measured cost on CPU (benchmarks/profile_step.py found them;
the figures are in benchmarks/RESULTS.md, "latent"):

- `dot_product_attention` works in the [B, heads, L, d] layout, where XLA's
  batched matmuls run as library calls (in [B, L, heads, d] they did not: the
  forward of a 256-token self-attention took 7x longer), and has a hand-written
  backward pass that reduces over [B, heads, Lq, d] instead of the [.., Lq, Lk]
  softmax (FlashAttention's D = rowsum(dO * O) trick, without the tiling).
- `dense` applies its kernel to the inputs flattened to [N, features_in], so the
  kernel's gradient is one plain matmul rather than a contraction over several
  batch axes.
- `gelu` is the exact GELU in PyTorch's erf form.
"""

from __future__ import annotations

import math

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


@jax.custom_vjp
def _attention(q, k, v, mask):
  return _attention_fwd(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
  logits = jnp.einsum('bhqd,bhkd->bhqk', q * (1 / math.sqrt(q.shape[-1])), k,
                      preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  p = p / jnp.sum(p, axis=-1, keepdims=True)
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
