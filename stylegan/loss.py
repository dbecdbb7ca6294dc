"""StyleGAN2 losses as pure functions (stylegan2-ada-pytorch's StyleGAN2Loss, split up).

* Non-saturating logistic loss for G and the logistic loss for D.
* R1: gamma/2 * E ||grad_x D(x)||^2 on reals, applied lazily every
  `d_reg_interval` steps with its weight multiplied by the interval.
* Path-length regularisation (G, lazy every `g_reg_interval` steps): images
  should change by a constant amount for a fixed-size step in W.
* Style mixing: with probability `prob`, the ws after a random layer come from
  a second latent, so the network cannot assume adjacent styles correlate.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def g_nonsaturating_loss(fake_logits: jax.Array) -> jax.Array:
  """-log sigmoid(D(G(z))) = softplus(-D(G(z)))."""
  return jnp.mean(jax.nn.softplus(-fake_logits))


def d_logistic_loss(real_logits: jax.Array, fake_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(softplus(D(G(z))), softplus(-D(x))) means: the fake and real halves of D's loss."""
  return jnp.mean(jax.nn.softplus(fake_logits)), jnp.mean(jax.nn.softplus(-real_logits))


def r1_penalty(d_fn: Callable[[jax.Array], jax.Array],
               reals: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-sample squared gradient norm ||grad_x D(x)||^2, and the logits D(x).

  `d_fn` maps images [N, ...] to logits [N]; samples are independent in D
  except through minibatch stddev, whose cross-sample terms the reference
  keeps too (it differentiates logits.sum()).
  """
  logits, vjp = jax.vjp(d_fn, reals)
  (grads,) = vjp(jnp.ones_like(logits))
  return jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))), logits


def path_lengths(synthesis_fn: Callable[[jax.Array], jax.Array], ws: jax.Array,
                 key: jax.Array) -> jax.Array:
  """|| J_w^T y || per sample, y ~ N(0, I) / sqrt(H*W) an image-space probe.

  Returns [N]: sqrt(mean over the num_ws of sum over w_dim of the grad^2).
  """
  img, vjp = jax.vjp(synthesis_fn, ws)
  h, w = img.shape[1], img.shape[2]
  noise = jax.random.normal(key, img.shape, img.dtype) / jnp.sqrt(float(h * w))
  (grads,) = vjp(noise)
  return jnp.sqrt(jnp.mean(jnp.sum(jnp.square(grads), axis=2), axis=1))


def path_length_penalty(lengths: jax.Array, pl_mean: jax.Array,
                        decay: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """(mean (|J^T y| - a)^2, new a), a the running mean of the lengths (decay 0.01).

  As in the reference, the new running mean is used in the penalty and its
  dependence on this batch's lengths is differentiated through.
  """
  pl_mean = jax.lax.stop_gradient(pl_mean)
  new_mean = pl_mean + decay * (jnp.mean(lengths) - pl_mean)
  penalty = jnp.mean(jnp.square(lengths - new_mean))
  return penalty, jax.lax.stop_gradient(new_mean)


def style_mix(key: jax.Array, ws: jax.Array, ws2: jax.Array, prob: float) -> jax.Array:
  """With probability `prob`, ws[:, cutoff:] = ws2[:, cutoff:], cutoff ~ U{1..num_ws-1}.

  One cutoff per batch, as in the reference.
  """
  num_ws = ws.shape[1]
  k_cut, k_mix = jax.random.split(key)
  cutoff = jax.random.randint(k_cut, (), 1, num_ws)
  cutoff = jnp.where(jax.random.uniform(k_mix, ()) < prob, cutoff, num_ws)
  layer = jnp.arange(num_ws)[None, :, None]
  return jnp.where(layer < cutoff, ws, ws2)
