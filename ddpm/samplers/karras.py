"""Samplers on sigmas: diffusers' Euler, Euler ancestral, Heun and DPM++(2M) Karras, their
registry entries and the `lax.scan` loop they share.

Karras et al. (2022) write the forward process as x = x0 + sigma * eps with
sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod), i.e. x = x_t / alpha_t. These
samplers step in sigma and call the model on x / sqrt(sigma^2 + 1) (= x_t) at a possibly
fractional timestep, as diffusers' schedulers of the same names do (Stable Diffusion's
usual choices); their sigma/timestep tables (`spacing.py`) follow those schedulers exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm.samplers.base import ModelFn, Run, Sampler
from ddpm.samplers.spacing import discrete_sigmas, multistep_karras_sigmas
from ddpm.schedules import Schedule


def _denoised(model_fn: ModelFn, prediction: str, x, sigma, t, clip_x0: bool):
  """x0 from the model at x = x0 + sigma eps (input scaled to x_t, timestep t); clipped to
  [-1, 1] for pixel models, as the other samplers do (diffusers' schedulers leave it, like
  SD's latents: clip_x0=False). Why it matters: on the cosine schedule sigma(T-1) ~ 2e4
  and the first Karras sigmas all round to t = T-1, so a network's eps error becomes an x0
  error ~1e4 times larger; unclipped, DPM++(2M) Karras turned the digits demo into noise."""
  c_in = 1.0 / jnp.sqrt(sigma**2 + 1.0)
  out = model_fn(x * c_in, jnp.full((x.shape[0],), t, jnp.float32)).astype(x.dtype)
  if prediction == 'eps':
    x0 = x - sigma * out
  elif prediction == 'v':
    x0 = out * (-sigma * c_in) + x * c_in**2
  else:
    x0 = out
  return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0


def _vp(sigma):
  """(alpha, sigma) of x_t = alpha x0 + sigma eps at Karras noise level `sigma`."""
  alpha = (sigma**2 + 1)**-0.5
  return alpha, sigma * alpha


@dataclasses.dataclass(frozen=True)
class SigmaStep:
  """What a sigma sampler's step sees at step `index` (traced arrays), and two helpers."""
  index: Any
  sigma: Any
  sigma_next: Any       # 0 after the last step.
  t: Any                # The model's (fractional) timestep at sigma ...
  t_next: Any           # ... and at sigma_next.
  sigma_prev: Any       # The previous step's sigma (sigma itself at the first step).
  x: jnp.ndarray
  x0_prev: jnp.ndarray  # The previous step's x0 (zeros at the first step).
  noise_key: jax.Array  # For stochastic samplers.
  inject_key: jax.Array
  denoised: Callable    # (x, sigma, t) -> the model's x0 (`_denoised` with the run's settings).
  injected: Callable    # (x, sigma_next, key) -> x with the run's `inject` applied.


def _euler_step(z: SigmaStep):
  x0 = z.denoised(z.x, z.sigma, z.t)
  d = (z.x - x0) / z.sigma
  return z.x + d * (z.sigma_next - z.sigma), x0


def _euler_ancestral_step(z: SigmaStep):
  x, sigma, sigma_next = z.x, z.sigma, z.sigma_next
  x0 = z.denoised(x, sigma, z.t)
  d = (x - x0) / sigma
  sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
  sigma_down = jnp.sqrt(sigma_next**2 - sigma_up**2)
  return x + d * (sigma_down - sigma) + jax.random.normal(z.noise_key, x.shape,
                                                          x.dtype) * sigma_up, x0


def _heun_step(z: SigmaStep):
  """The Euler step, then the trapezoid rule (Euler into sigma = 0)."""
  x, sigma, sigma_next = z.x, z.sigma, z.sigma_next
  x0 = z.denoised(x, sigma, z.t)
  d = (x - x0) / sigma
  # diffusers' inpainting re-imposes the known region after the Euler half step too, so
  # the second derivative is taken there.
  x_euler = z.injected(x + d * (sigma_next - sigma), sigma_next, z.inject_key)
  safe = jnp.where(sigma_next > 0, sigma_next, 1.0)
  d2 = (x_euler - z.denoised(x_euler, safe, z.t_next)) / safe
  return jnp.where(sigma_next > 0, x + 0.5 * (d + d2) * (sigma_next - sigma), x_euler), x0


def _dpmpp_2m_step(z: SigmaStep):
  """DPM-Solver++(2M) on x_t = alpha x0 + sigma_vp eps with alpha = 1/sqrt(sigma^2+1),
  lambda = -log sigma (x is x_t itself)."""
  x, sigma, sigma_next = z.x, z.sigma, z.sigma_next
  alpha, alpha_n = _vp(sigma)[0], _vp(sigma_next)[0]
  x0 = z.denoised(x / alpha, sigma, z.t)
  last = sigma_next == 0
  h = jnp.where(last, 1.0, jnp.log(sigma) - jnp.log(jnp.where(last, 1.0, sigma_next)))
  r = (jnp.log(z.sigma_prev) - jnp.log(sigma)) / h
  first_order = (z.index == 0) | last
  d = jnp.where(first_order, x0, (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * z.x0_prev)
  ratio = (sigma_next * alpha_n) / (sigma * alpha)
  return jnp.where(last, x0, ratio * x - alpha_n * jnp.expm1(-h) * d), x0


@dataclasses.dataclass(frozen=True)
class SigmaSampler(Sampler):
  """A sampler stepping in sigma on x = x_t / alpha (or, `on_xt`, on x_t itself)."""
  # (schedule, S, spacing, karras, steps_offset) -> (sigmas [S+1] ending in 0, model
  # timesteps [S], initial noise scale).
  table: Callable[..., tuple]
  step: Callable[[SigmaStep], tuple]  # SigmaStep -> (x at sigma_next before `inject`, x0).
  on_xt: bool = False

  def run(self, s: Schedule, model_fn: ModelFn, x_T: jnp.ndarray, rng: jax.Array, run: Run):
    prediction, clip_x0, num_snapshots = run.prediction, run.clip_x0, run.num_snapshots
    inject, init_x0, first = run.inject, run.init_x0, run.first
    sigmas, ts, init = self.table(s, run.num_steps, run.spacing, run.karras, run.steps_offset)
    # Image-to-image starts `first` steps in, as diffusers' img2img (set_begin_index).
    sigmas, ts = sigmas[first:], ts[first:]
    S = len(ts)
    ts_next = np.append(ts[1:], 0.0).astype(np.float32)
    in_vp = self.on_xt  # It steps on x_t itself; the others on x_t / alpha.

    def injected(x, sigma_next, key):
      """`inject` sees x_t and the VP coefficients of the level the step landed on."""
      if inject is None:
        return x
      alpha, sigma_vp = _vp(sigma_next)
      return inject(x * (1.0 if in_vp else alpha), alpha, sigma_vp, key) / (1.0 if in_vp else alpha)

    denoised = lambda x, sigma, t: _denoised(model_fn, prediction, x, sigma, t, clip_x0)

    def body(carry, inputs):
      x, x0_prev, key = carry
      i, sigma, sigma_next, t, t_next, sigma_prev = inputs
      key, noise_key, inject_key = jax.random.split(key, 3)
      x, x0 = self.step(SigmaStep(i, sigma, sigma_next, t, t_next, sigma_prev, x, x0_prev,
                                  noise_key, inject_key, denoised, injected))
      x = injected(x, sigma_next, inject_key)
      if in_vp:
        return (x, x0, key), (x if num_snapshots else None)
      # Snapshots as x_t (what the other samplers show): x / sqrt(sigma^2 + 1).
      return (x, x0, key), (x * _vp(sigma_next)[0] if num_snapshots else None)

    f = lambda a: jnp.asarray(a, jnp.float32)
    sigma_prev = np.insert(sigmas[:S - 1], 0, sigmas[0])
    xs = (jnp.arange(S), f(sigmas[:S]), f(sigmas[1:]), f(ts), f(ts_next), f(sigma_prev))
    if init_x0 is None:
      x_start = x_T * init
    else:  # diffusers' add_noise at the first sigma: x0 + sigma noise (alpha x0 + ... on x_t).
      alpha, sigma_vp = _vp(sigmas[0])
      x_start = alpha * init_x0 + sigma_vp * x_T if in_vp else init_x0 + sigmas[0] * x_T
    (x0, _, _), trajectory = jax.lax.scan(body, (x_start, jnp.zeros_like(x_T), rng), xs)
    if not num_snapshots:
      return x0
    idx = np.unique(np.linspace(0, S - 1, num_snapshots - 1).round().astype(int))
    start = x_T if init_x0 is None else x_start * (1.0 if in_vp else _vp(sigmas[0])[0])
    snapshots = jnp.concatenate([start[None], trajectory[idx]], axis=0)
    start_t = s.num_timesteps if init_x0 is None else ts[0]
    snapshot_t = np.concatenate([[start_t], np.maximum(ts_next[idx], 0)]).round()
    return x0, snapshots, snapshot_t.astype(np.int32)


# In the config's order (ddpm.configs.default.SIGMA_SAMPLERS).
SAMPLERS: dict[str, SigmaSampler] = {
    'euler': SigmaSampler(discrete_sigmas, _euler_step),
    'euler_ancestral': SigmaSampler(discrete_sigmas, _euler_ancestral_step),
    'heun': SigmaSampler(discrete_sigmas, _heun_step),
    'dpmpp_2m_karras': SigmaSampler(multistep_karras_sigmas, _dpmpp_2m_step, on_xt=True),
}
