"""Classifier-free guidance (Ho & Salimans 2022) as pure functions.

Training drops the condition to the null context with probability p, so one
network learns both eps(x, c) and eps(x, null). Sampling then extrapolates
from the unconditional towards the conditional prediction.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def drop_condition(rng: jax.Array, context: jnp.ndarray, mask: jnp.ndarray,
                   null_context: jnp.ndarray, null_mask: jnp.ndarray, prob: float):
  """Replaces each example's (context, mask) by the null one with probability `prob`.

  Returns (context, mask, dropped [B] bool).
  """
  dropped = jax.random.bernoulli(rng, prob, (context.shape[0],))
  return (*use_null_where(dropped, context, mask, null_context, null_mask), dropped)


def use_null_where(dropped: jnp.ndarray, context: jnp.ndarray, mask: jnp.ndarray,
                   null_context: jnp.ndarray, null_mask: jnp.ndarray):
  """(context, mask) with the examples where `dropped` [B] is True replaced by the null ones."""
  context = jnp.where(dropped[:, None, None], null_context, context)
  mask = jnp.where(dropped[:, None], null_mask, mask)
  return context, mask


def combine(cond: jnp.ndarray, uncond: jnp.ndarray, scale) -> jnp.ndarray:
  """uncond + scale * (cond - uncond): scale 1 is the conditional model, 0 the unconditional."""
  return uncond + scale * (cond - uncond)


def guided_model_fn(apply_fn: Callable, context, mask, null_context, null_mask, scale):
  """fn(x, t) for the samplers: both predictions from ONE batched forward pass.

  apply_fn(x, t, context, mask) is the denoiser; the batch is [x; x] with
  [context; null], then split and combined.
  """
  both_context = jnp.concatenate([context, null_context], axis=0)
  both_mask = jnp.concatenate([mask, null_mask], axis=0)

  def model_fn(x, t):
    out = apply_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0),
                   both_context, both_mask)
    cond, uncond = jnp.split(out, 2, axis=0)
    return combine(cond, uncond, scale)

  return model_fn
