"""The forward process, its posterior, and the training objective (pure functions).

Notation of Ho et al. (2020): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
The network predicts eps, x_0 or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
(Salimans & Ho 2022); every prediction converts to the other two.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ddpm.configs.default import PREDICTIONS  # The choice list lives with the config.
from ddpm.schedules import Schedule


def _at(a: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """a[t] shaped [B, 1, 1, ...] to broadcast against a [B, ...] batch."""
  return a[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def q_sample(s: Schedule, x0: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
  """Samples q(x_t | x_0) in closed form."""
  return (_at(s.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + _at(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * eps)


def q_posterior(s: Schedule, x0: jnp.ndarray, xt: jnp.ndarray, t: jnp.ndarray):
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
  mean = (_at(s.posterior_mean_coef1, t, xt.ndim) * x0
          + _at(s.posterior_mean_coef2, t, xt.ndim) * xt)
  return (mean, _at(s.posterior_variance, t, xt.ndim),
          _at(s.posterior_log_variance_clipped, t, xt.ndim))


def velocity(s: Schedule, x0: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
  """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0."""
  return (_at(s.sqrt_alphas_cumprod, t, x0.ndim) * eps
          - _at(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def to_x0_eps(s: Schedule, prediction: str, model_output: jnp.ndarray, xt: jnp.ndarray,
              t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(x_0, eps) implied by the network's output under the given parameterisation."""
  a = _at(s.sqrt_alphas_cumprod, t, xt.ndim)
  sig = _at(s.sqrt_one_minus_alphas_cumprod, t, xt.ndim)
  if prediction == 'eps':
    eps = model_output
    return (xt - sig * eps) / a, eps
  if prediction == 'x0':
    x0 = model_output
    return x0, (xt - a * x0) / sig
  if prediction == 'v':
    v = model_output
    return a * xt - sig * v, sig * xt + a * v
  raise ValueError(f'Unknown prediction {prediction!r}; valid: {", ".join(PREDICTIONS)}.')


def snr(s: Schedule, t: jnp.ndarray) -> jnp.ndarray:
  """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t)."""
  ab = s.alphas_cumprod[t]
  return ab / (1.0 - ab)


def loss_weight(s: Schedule, t: jnp.ndarray, prediction: str, min_snr_gamma: float) -> jnp.ndarray:
  """Min-SNR-gamma weighting (Hang et al. 2023), expressed for each target.

  The paper weights the x_0-MSE by min(SNR, gamma); the same weight on the
  eps-MSE is min(SNR, gamma) / SNR and on the v-MSE min(SNR, gamma) / (SNR + 1).
  gamma = 0 turns weighting off (all ones, the "simple" loss of DDPM).
  """
  if not min_snr_gamma:
    return jnp.ones(t.shape, jnp.float32)
  r = snr(s, t)
  clipped = jnp.minimum(r, min_snr_gamma)
  return {'eps': clipped / r, 'x0': clipped, 'v': clipped / (r + 1.0)}[prediction]


def diffusion_loss(s: Schedule, model_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
                   x0: jnp.ndarray, rng: jax.Array, prediction: str = 'eps',
                   min_snr_gamma: float = 0.0) -> tuple[jnp.ndarray, dict]:
  """L = E_{t, eps} w(t) || target - model(x_t, t) ||^2 with t ~ U{0..T-1}.

  Returns the batch-mean loss and per-example metrics.
  """
  t, eps = draw_t_eps(s, rng, x0)
  return denoising_loss(s, model_fn, x0, t, eps, prediction, min_snr_gamma)


def draw_t_eps(s: Schedule, rng: jax.Array, x0: jnp.ndarray):
  """The loss's randomness for a batch: t ~ U{0..T-1} [B] and eps ~ N(0, I) like x0."""
  t_rng, eps_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (x0.shape[0],), 0, s.num_timesteps)
  return t, jax.random.normal(eps_rng, x0.shape, x0.dtype)


def denoising_loss(s: Schedule, model_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
                   x0: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray, prediction: str = 'eps',
                   min_snr_gamma: float = 0.0,
                   weights: jnp.ndarray | None = None) -> tuple[jnp.ndarray, dict]:
  """`diffusion_loss` at given (t, eps): a mean over examples, so it can be accumulated
  over micro-batches of (x0, t, eps) drawn once for the whole batch. `weights` [B]
  weighs examples (DreamBooth's prior-preservation loss)."""
  xt = q_sample(s, x0, t, eps)
  if prediction == 'eps':
    target = eps
  elif prediction == 'x0':
    target = x0
  elif prediction == 'v':
    target = velocity(s, x0, t, eps)
  else:
    raise ValueError(f'Unknown prediction {prediction!r}; valid: {", ".join(PREDICTIONS)}.')
  out = model_fn(xt, t).astype(jnp.float32)
  mse = jnp.mean((out - target)**2, axis=tuple(range(1, x0.ndim)))
  w = loss_weight(s, t, prediction, min_snr_gamma)
  loss = jnp.mean(w * mse if weights is None else weights * w * mse)
  return loss, {'mse': jnp.mean(mse)}
