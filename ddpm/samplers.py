"""Samplers: DDPM ancestral (all T steps), DDIM (S steps, eta), DPM-Solver++(2M), UniPC, and
diffusers' Euler, Euler ancestral, Heun and DPM++(2M) Karras (stepping in sigma).

Each sampler is a pure step function plus a loop written with `lax.scan`, so
the whole trajectory compiles into one XLA program: no Python per step.

`model_fn(x_t, t) -> model output` is any closure over parameters (and, for
latent diffusion, over the conditioning and guidance); `prediction` says
whether it predicts eps, x0 or v.

Timestep spacings follow diffusers' schedulers (Lin et al. 2023, table 2); for DDIM:
  leading   t_i = i * (T // S) (+ offset), descending: 980, 960, ..., 0 for S=50
  trailing  t_i = round(T - i * T/S) - 1: 999, 979, ..., 19
  linspace  round(linspace(0, T - 1, S)), descending.
The multistep solvers (dpm_solver, unipc) split the range into S + 1 points for leading and
linspace and drop the last, as diffusers' DPMSolverMultistep and UniPC schedulers do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm import diffusion
from ddpm.configs.default import SIGMA_SAMPLERS, SPACINGS  # Choice lists live with the config.
from ddpm.schedules import Schedule

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def timesteps(num_train_timesteps: int, num_steps: int, spacing: str = 'leading',
              steps_offset: int = 0) -> np.ndarray:
  """Descending inference timesteps as diffusers' DDIMScheduler.set_timesteps."""
  if not 1 <= num_steps <= num_train_timesteps:
    raise ValueError(f'num_steps must be in [1, {num_train_timesteps}], got {num_steps}.')
  T, S = num_train_timesteps, num_steps
  if spacing == 'leading':
    ts = (np.arange(S) * (T // S)).round()[::-1] + steps_offset
  elif spacing == 'trailing':
    ts = np.round(np.arange(T, 0, -T / S)) - 1
  elif spacing == 'linspace':
    ts = np.linspace(0, T - 1, S).round()[::-1]
  else:
    raise ValueError(f'Unknown timestep spacing {spacing!r}; valid: {", ".join(SPACINGS)}.')
  return ts.astype(np.int32)


def multistep_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = 'leading',
                        steps_offset: int = 0) -> np.ndarray:
  """Descending timesteps as diffusers' multistep solvers (DPMSolverMultistep, UniPC) set them:
  'leading' and 'linspace' split the range into S + 1 and drop the last point."""
  if not 1 <= num_steps <= num_train_timesteps:
    raise ValueError(f'num_steps must be in [1, {num_train_timesteps}], got {num_steps}.')
  T, S = num_train_timesteps, num_steps
  if spacing == 'leading':
    ts = (np.arange(S + 1) * (T // (S + 1))).round()[::-1][:-1] + steps_offset
  elif spacing == 'linspace':
    ts = np.linspace(0, T - 1, S + 1).round()[::-1][:-1]
  else:
    return timesteps(T, S, spacing, steps_offset)
  return ts.astype(np.int32)


def _predict(s: Schedule, model_fn: ModelFn, prediction: str, x: jnp.ndarray, t: jnp.ndarray,
             clip_x0: bool):
  tb = jnp.full((x.shape[0],), t, jnp.int32)
  x0, eps = diffusion.to_x0_eps(s, prediction, model_fn(x, tb), x, tb)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
  return x0, eps


# --- DDPM -------------------------------------------------------------------

def ddpm_step(s: Schedule, x0: jnp.ndarray, xt: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray,
              variance: str = 'fixed_small') -> jnp.ndarray:
  """One ancestral step: x_{t-1} ~ N(mu~_t(x_t, x_0), sigma_t^2 I), no noise at t = 0.

  'fixed_small' uses sigma_t^2 = beta~_t (posterior variance), 'fixed_large' beta_t;
  the DDPM paper found both equally good.
  """
  tb = jnp.full((xt.shape[0],), t, jnp.int32)
  mean, _, log_var = diffusion.q_posterior(s, x0, xt, tb)
  if variance == 'fixed_large':
    # As in the DDPM code: log(append(beta~_1, beta_2:)); t = 0 adds no noise anyway.
    log_var = jnp.log(jnp.where(t == 0, s.posterior_variance[1], s.betas[t]))
  return mean + jnp.where(t > 0, jnp.exp(0.5 * log_var), 0.0) * noise


# --- DDIM -------------------------------------------------------------------

def ddim_step(s: Schedule, x0: jnp.ndarray, eps: jnp.ndarray, xt: jnp.ndarray, t: jnp.ndarray,
              t_prev: jnp.ndarray, eta: float, noise: jnp.ndarray,
              final_alpha_cumprod: float = 1.0) -> jnp.ndarray:
  """x_{t_prev} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z (Song et al. eq. 12).

  sigma = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)); t_prev < 0 means the
  end of the chain, where a_prev = final_alpha_cumprod (1: a noise-free x_0).
  """
  a_t = s.alphas_cumprod[t]
  a_prev = jnp.where(t_prev >= 0, s.alphas_cumprod[jnp.maximum(t_prev, 0)], final_alpha_cumprod)
  sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
  direction = jnp.sqrt(jnp.maximum(1 - a_prev - sigma**2, 0.0)) * eps
  return jnp.sqrt(a_prev) * x0 + direction + sigma * noise


# --- DPM-Solver++(2M) ---------------------------------------------------------

def _lambda(s: Schedule, t):
  """Half log-SNR, log(alpha_t / sigma_t)."""
  a = s.alphas_cumprod[t]
  return 0.5 * (jnp.log(a) - jnp.log1p(-a))


def dpm_solver_2m_step(s: Schedule, x0: jnp.ndarray, x0_prev: jnp.ndarray, xt: jnp.ndarray,
                       t: jnp.ndarray, t_prev_model: jnp.ndarray, t_next: jnp.ndarray,
                       first_order: jnp.ndarray) -> jnp.ndarray:
  """DPM-Solver++(2M) (Lu et al. 2022, alg. 2) with data prediction.

  x_{t_next} = (sigma_next / sigma_t) x_t - alpha_next (e^{-h} - 1) D, with
  D = x0 (first order) or (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_prev / h.
  t_next < 0 is the end of the chain: the result is the model's x0.
  """
  a_t = s.alphas_cumprod[t]
  last = t_next < 0
  a_n = jnp.where(last, 1.0, s.alphas_cumprod[jnp.maximum(t_next, 0)])
  sig_t, sig_n = jnp.sqrt(1 - a_t), jnp.sqrt(1 - a_n)
  lam_t, lam_prev = _lambda(s, t), _lambda(s, t_prev_model)
  lam_n = jnp.where(last, jnp.inf, _lambda(s, jnp.maximum(t_next, 0)))
  h = lam_n - lam_t
  r = (lam_t - lam_prev) / jnp.where(last, 1.0, h)
  d = jnp.where(first_order, x0, (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev)
  x_next = (sig_n / sig_t) * xt - jnp.sqrt(a_n) * jnp.expm1(-jnp.where(last, 0.0, h)) * d
  return jnp.where(last, x0, x_next)


# --- UniPC (bh2) ------------------------------------------------------------------

def _unipc_rhos(h, rk):
  """UniPC's B(h) = e^{-h} - 1 ('bh2') and the corrector's weights (rho_1, rho_2) for
  order 2 (Zhao et al. 2023, alg. 2; diffusers' multistep_uni_c_bh_update): the solution
  of [[1, 1], [rk, 1]] rho = b with b_k = k! phi_{k+1}(-h) / B(h)."""
  hh = -h
  b_h = jnp.expm1(hh)
  phi_2 = jnp.expm1(hh) / hh - 1       # h phi_2 in diffusers' recursion.
  b1 = phi_2 / b_h
  b2 = (phi_2 / hh - 0.5) * 2 / b_h
  rho1 = (b1 - b2) / (1 - rk)
  return b_h, rho1, b1 - rho1


def unipc_step(s: Schedule, x0: jnp.ndarray, x0_prev: jnp.ndarray, x0_prev2: jnp.ndarray,
               x: jnp.ndarray, last_x: jnp.ndarray, index, num_steps: int, t, t_prev, t_prev2,
               t_next):
  """One UniPC-2 step (bh2, data prediction), as diffusers' UniPCMultistepScheduler.

  First the corrector UniC refines the current x from the previous step's start `last_x`
  using the model output x0 at x (no extra evaluation); then the predictor UniP steps the
  corrected x to t_next. Orders: 1 at the first step and (lower_order_final) the last.
  Returns (x at t_next, the corrected x: the next step's `last_x`).
  """
  lam = lambda t: _lambda(s, t)
  alpha_sig = lambda t: (jnp.sqrt(s.alphas_cumprod[t]), jnp.sqrt(1 - s.alphas_cumprod[t]))
  # Corrector, from t_prev to t (order 1 after the first step, else 2).
  a_t, sig_t = alpha_sig(t)
  _, sig_p = alpha_sig(t_prev)
  h = lam(t) - lam(t_prev)
  rk = (lam(t_prev2) - lam(t_prev)) / h
  b_h, rho1, rho2 = _unipc_rhos(h, rk)
  order1 = index == 1
  rho1, rho2 = jnp.where(order1, 0.0, rho1), jnp.where(order1, 0.5, rho2)
  d1 = jnp.where(order1, 0.0, 1.0) * (x0_prev2 - x0_prev) / jnp.where(order1, 1.0, rk)
  corrected = (sig_t / sig_p) * last_x - a_t * jnp.expm1(-h) * x0_prev - a_t * b_h * (
      rho1 * d1 + rho2 * (x0 - x0_prev))
  x = jnp.where(index > 0, corrected, x)
  # Predictor, from t to t_next (order 1 at the first and last steps; t_next < 0: x0).
  last = t_next < 0
  a_n, sig_n = alpha_sig(jnp.maximum(t_next, 0))
  h = jnp.where(last, 1.0, lam(jnp.maximum(t_next, 0)) - lam(t))
  rk = (lam(t_prev) - lam(t)) / h
  second = (index > 0) & (index < num_steps - 1)
  d1 = (x0_prev - x0) / rk
  x_next = (sig_n / sig_t) * x - a_n * jnp.expm1(-h) * x0 - a_n * jnp.expm1(-h) * jnp.where(
      second, 0.5 * d1, 0.0)
  return jnp.where(last, x0, x_next), x


# --- Samplers on sigmas: diffusers' Euler, Euler ancestral, Heun, DPM++(2M) Karras ---------
#
# Karras et al. (2022) write the forward process as x = x0 + sigma * eps with
# sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod), i.e. x = x_t / alpha_t. These
# samplers step in sigma and call the model on x / sqrt(sigma^2 + 1) (= x_t) at a possibly
# fractional timestep, as diffusers' schedulers of the same names do (Stable Diffusion's
# usual choices); their sigma/timestep tables below follow those schedulers exactly.


def _train_sigmas(s: Schedule) -> np.ndarray:
  a = np.asarray(s.alphas_cumprod, np.float64)
  return np.sqrt((1 - a) / a)


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """The (fractional) timestep of each sigma, interpolating log sigma linearly."""
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, None]
  low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
  w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
  return (1 - w) * low + w * (low + 1)


def _karras(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
  """Karras et al.'s (eq. 5) n sigmas from sigma_max down to sigma_min."""
  ramp = np.linspace(0, 1, n)
  lo, hi = sigma_min**(1 / rho), sigma_max**(1 / rho)
  return (hi + ramp * (lo - hi))**rho


def sigma_schedule(s: Schedule, num_steps: int, spacing: str = 'linspace', karras: bool = False,
                   steps_offset: int = 0, sampler: str = 'euler'):
  """(sigmas [S+1] ending in 0, model timesteps [S] (float), initial noise scale).

  'euler'/'euler_ancestral'/'heun': diffusers' Euler*/Heun set_timesteps (float timesteps
  by `spacing`, sigmas interpolated; Karras sigmas between those ends); 'dpmpp_2m_karras':
  DPMSolverMultistepScheduler(use_karras_sigmas=True) (Karras sigmas over the whole
  training range, timesteps rounded, initial noise scale 1: it steps on x_t itself).
  """
  T, S = s.num_timesteps, num_steps
  train_sigmas = _train_sigmas(s)
  log_sigmas = np.log(train_sigmas)
  if sampler == 'dpmpp_2m_karras':
    sigmas = _karras(train_sigmas[-1], train_sigmas[0], S)
    ts = _sigma_to_t(sigmas, log_sigmas).round()
    return np.append(sigmas, 0.0), ts, 1.0
  if spacing == 'linspace':
    ts = np.linspace(0, T - 1, S, dtype=np.float32)[::-1].astype(np.float64)
  elif spacing == 'leading':
    ts = (np.arange(S) * (T // S)).round()[::-1].astype(np.float64) + steps_offset
  elif spacing == 'trailing':
    ts = np.round(np.arange(T, 0, -T / S)) - 1.0
  else:
    raise ValueError(f'Unknown timestep spacing {spacing!r}; valid: {", ".join(SPACINGS)}.')
  sigmas = np.interp(ts, np.arange(T), train_sigmas)
  if karras:
    sigmas = _karras(sigmas[0], sigmas[-1], S)
    ts = _sigma_to_t(sigmas, log_sigmas)
  sigmas = np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)  # diffusers' float32.
  init = sigmas.max() if spacing in ('linspace', 'trailing') else math.sqrt(sigmas.max()**2 + 1)
  return sigmas, ts.astype(np.float32), init


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


def _sample_sigmas(s: Schedule, model_fn: ModelFn, x_T, rng, sampler: str, num_steps: int,
                   spacing: str, prediction: str, karras: bool, num_snapshots: int,
                   steps_offset: int = 0, clip_x0: bool = False, first: int = 0,
                   init_x0=None, inject=None):
  sigmas, ts, init = sigma_schedule(s, num_steps, spacing, karras, steps_offset, sampler)
  # Image-to-image starts `first` steps in, as diffusers' img2img (set_begin_index).
  sigmas, ts = sigmas[first:], ts[first:]
  S = len(ts)
  ts_next = np.append(ts[1:], 0.0).astype(np.float32)
  in_vp = sampler == 'dpmpp_2m_karras'  # It steps on x_t itself; the others on x_t / alpha.

  def injected(x, sigma_next, key):
    """`inject` sees x_t and the VP coefficients of the level the step landed on."""
    if inject is None:
      return x
    alpha, sigma_vp = _vp(sigma_next)
    return inject(x * (1.0 if in_vp else alpha), alpha, sigma_vp, key) / (1.0 if in_vp else alpha)

  def body(carry, inputs):
    x, x0_prev, key = carry
    i, sigma, sigma_next, t, t_next, sigma_prev = inputs
    key, noise_key, inject_key = jax.random.split(key, 3)
    if in_vp:
      # On x_t = alpha x0 + sigma_vp eps with alpha = 1/sqrt(sigma^2+1), lambda = -log sigma.
      alpha, alpha_n = _vp(sigma)[0], _vp(sigma_next)[0]
      x0 = _denoised(model_fn, prediction, x / alpha, sigma, t, clip_x0)
      last = sigma_next == 0
      h = jnp.where(last, 1.0, jnp.log(sigma) - jnp.log(jnp.where(last, 1.0, sigma_next)))
      r = (jnp.log(sigma_prev) - jnp.log(sigma)) / h
      first_order = (i == 0) | last
      d = jnp.where(first_order, x0, (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev)
      ratio = (sigma_next * alpha_n) / (sigma * alpha)
      x = injected(jnp.where(last, x0, ratio * x - alpha_n * jnp.expm1(-h) * d), sigma_next,
                   inject_key)
      return (x, x0, key), (x if num_snapshots else None)
    x0 = _denoised(model_fn, prediction, x, sigma, t, clip_x0)
    d = (x - x0) / sigma
    if sampler == 'euler':
      x = x + d * (sigma_next - sigma)
    elif sampler == 'euler_ancestral':
      sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
      sigma_down = jnp.sqrt(sigma_next**2 - sigma_up**2)
      x = x + d * (sigma_down - sigma) + jax.random.normal(noise_key, x.shape, x.dtype) * sigma_up
    else:  # heun: the Euler step, then the trapezoid rule (Euler into sigma = 0).
      # diffusers' inpainting re-imposes the known region after the Euler half step too, so
      # the second derivative is taken there.
      x_euler = injected(x + d * (sigma_next - sigma), sigma_next, inject_key)
      safe = jnp.where(sigma_next > 0, sigma_next, 1.0)
      d2 = (x_euler - _denoised(model_fn, prediction, x_euler, safe, t_next, clip_x0)) / safe
      x = jnp.where(sigma_next > 0, x + 0.5 * (d + d2) * (sigma_next - sigma), x_euler)
    x = injected(x, sigma_next, inject_key)
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


# --- The registry ---------------------------------------------------------------
#
# A sampler is its inference timesteps, the timestep each step goes to, and the update
# x_t -> x_{t_next}. Adding one touches this file (and the config's documented choices)
# only: `sample` and every caller look samplers up here.


@dataclasses.dataclass(frozen=True)
class StepInputs:
  """What a sampler's update sees at step `index` of `num_steps` (traced arrays)."""
  index: Any
  num_steps: int
  t: Any
  t_next: Any           # < 0 after the last step.
  t_prev_model: Any     # The previous step's timestep (multistep solvers' history).
  x: jnp.ndarray
  x0: jnp.ndarray       # The model's prediction of x_0 at (x, t) ...
  eps: jnp.ndarray      # ... and of the noise.
  x0_prev: jnp.ndarray  # The previous step's x0 (zeros at the first step).
  noise: jnp.ndarray    # Fresh N(0, I) for stochastic samplers.
  state: Any = None     # What the sampler's update returned last step (Sampler.state).


@dataclasses.dataclass(frozen=True)
class Sampler:
  timesteps: Callable[[int, int, str, int], np.ndarray] | None = None  # (T, S, spacing,
                                                                       # steps_offset) -> ts.
  next_timesteps: Callable[[np.ndarray, int], np.ndarray] | None = None  # (ts, T) -> next ts.
  update: Callable[..., jnp.ndarray] | None = None  # (schedule, StepInputs, **options) -> x.
  in_sigma: bool = False  # Steps in sigma instead: `_sample_sigmas` (its tables by name).
  # A sampler that keeps more history: state(x_T) is its initial state, and update returns
  # (x, state) instead of x.
  state: Callable[[jnp.ndarray], Any] | None = None


def _following(ts: np.ndarray, T: int) -> np.ndarray:  # pylint: disable=unused-argument
  return np.append(ts[1:], -1).astype(np.int32)


def _ddpm_update(s: Schedule, z: StepInputs, ddpm_variance: str = 'fixed_small', **unused):
  return ddpm_step(s, z.x0, z.x, z.t, z.noise, ddpm_variance)


def _ddim_update(s: Schedule, z: StepInputs, eta: float = 0.0, final_alpha_cumprod: float = 1.0,
                 **unused):
  return ddim_step(s, z.x0, z.eps, z.x, z.t, z.t_next, eta, z.noise, final_alpha_cumprod)


def _dpm_solver_update(s: Schedule, z: StepInputs, **unused):
  # Lower-order at the first and (for few steps) the last step, as diffusers' lower_order_final.
  first_order = (z.index == 0) | ((z.t_next < 0) & (z.num_steps < 15))
  return dpm_solver_2m_step(s, z.x0, z.x0_prev, z.x, z.t, z.t_prev_model, z.t_next, first_order)


def _unipc_update(s: Schedule, z: StepInputs, **unused):
  x0_prev2, last_x, t_prev2 = z.state
  x, corrected = unipc_step(s, z.x0, z.x0_prev, x0_prev2, z.x, last_x, z.index, z.num_steps,
                            z.t, z.t_prev_model, t_prev2, z.t_next)
  return x, (z.x0_prev, corrected, z.t_prev_model)


SAMPLERS: dict[str, Sampler] = {
    # Ancestral DDPM always runs all T steps.
    'ddpm': Sampler(lambda T, S, spacing, offset: np.arange(T - 1, -1, -1, dtype=np.int32),
                    _following, _ddpm_update),
    # diffusers' DDIM rule for the step after t: t - T//S (also with trailing spacing).
    'ddim': Sampler(timesteps, lambda ts, T: ts - T // len(ts), _ddim_update),
    'dpm_solver': Sampler(multistep_timesteps, _following, _dpm_solver_update),
    'unipc': Sampler(multistep_timesteps, _following, _unipc_update,
                     state=lambda x: (jnp.zeros_like(x), jnp.zeros_like(x), jnp.int32(0))),
    **{name: Sampler(in_sigma=True) for name in SIGMA_SAMPLERS},
}


def options_from_config(config, **overrides) -> dict:
  """`sample` keyword arguments from an experiment config's `sample` and `diffusion` blocks.

  The one place that maps the config to sampler settings (ddpm and latent use it).
  """
  s = config.sample
  kwargs = dict(sampler=s.sampler, num_steps=s.num_steps, eta=s.eta, spacing=s.spacing,
                prediction=config.diffusion.prediction, clip_x0=s.clip_x0,
                ddpm_variance=s.ddpm_variance, karras=s.karras_sigmas)
  kwargs.update(overrides)
  return kwargs


def reimposing(init_x0: jnp.ndarray, keep: jnp.ndarray, noise: jnp.ndarray | None = None):
  """Inpainting's `inject`: where `keep` is 1, x_t is init_x0 noised to the step's level.

  `noise` None draws fresh noise at every step; diffusers' inpainting pipeline re-uses its
  initial noise instead (pass it, for the same images).
  """
  def inject(x, alpha, sigma, key):
    eps = jax.random.normal(key, x.shape, x.dtype) if noise is None else noise
    return keep * (alpha * init_x0 + sigma * eps) + (1.0 - keep) * x
  return inject


# --- Loops --------------------------------------------------------------------

def sample(s: Schedule, model_fn: ModelFn, x_T: jnp.ndarray, rng: jax.Array,
           sampler: str = 'ddim', num_steps: int = 50, eta: float = 0.0,
           spacing: str = 'leading', prediction: str = 'eps', clip_x0: bool = True,
           ddpm_variance: str = 'fixed_small', num_snapshots: int = 0,
           inject: Optional[Callable] = None, init_x0: Optional[jnp.ndarray] = None,
           strength: float = 1.0, karras: bool = False, steps_offset: int = 0,
           final_alpha_cumprod: float = 1.0):
  """Runs a sampler from x_T to x_0; call inside jax.jit.

  Args:
    num_steps: S for every sampler but ddpm, which always uses all T steps (heun calls the
      model 2S - 1 times).
    karras: Karras et al.'s sigmas for euler and heun (dpmpp_2m_karras always has them).
    steps_offset, final_alpha_cumprod: diffusers' scheduler settings of those names (SD's
      configs: steps_offset=1 with 'leading' spacing; set_alpha_to_one=False, i.e. DDIM's
      last step lands on alphas_cumprod[0] instead of 1).
    init_x0, strength: SDEdit (image-to-image, Meng et al. 2022) as diffusers'
      img2img: only the last int(strength * steps) steps run, starting from
      init_x0 noised to the first of them with x_T as the noise. strength 0
      returns init_x0 itself, 1 ignores it.
    num_snapshots: if > 0, also returns x_t at that many evenly spaced steps
      (the progressive-generation figure), shape [K, B, ...].
    inject: optional fn(x_t, alpha, sigma, rng) -> x_t applied after each step, where
      x_t = alpha x_0 + sigma eps is the noise level the step landed on (1, 0 after the
      last); inpainting uses it to re-impose the known region noised to that level.

  Returns:
    x_0, or (x_0, snapshots, snapshot_timesteps) with num_snapshots.
  """
  T = s.num_timesteps
  if sampler not in SAMPLERS:
    raise ValueError(f'Unknown sampler {sampler!r}; valid: {", ".join(SAMPLERS)}.')
  entry = SAMPLERS[sampler]
  first = 0
  if init_x0 is not None:
    if not 0.0 <= strength <= 1.0:
      raise ValueError(f'strength must be in [0, 1], got {strength}.')
    # diffusers' img2img: the last int(S * strength) of the S steps run (ddpm: of all T).
    S = T if sampler == 'ddpm' else num_steps
    first = S - min(int(S * strength), S)
    if first == S:
      return (init_x0, init_x0[None], np.array([0])) if num_snapshots else init_x0
  if entry.in_sigma:
    return _sample_sigmas(s, model_fn, x_T, rng, sampler, num_steps, spacing, prediction, karras,
                          num_snapshots, steps_offset, clip_x0, first, init_x0, inject)
  ts = entry.timesteps(T, num_steps, spacing, steps_offset)
  ts_next = entry.next_timesteps(ts, T)
  options = dict(eta=eta, ddpm_variance=ddpm_variance, final_alpha_cumprod=final_alpha_cumprod)
  ts_prev_model = np.insert(ts[:-1], 0, ts[0]).astype(np.int32)  # For the 2M history.
  if init_x0 is not None:
    ts, ts_next, ts_prev_model = ts[first:], ts_next[first:], ts_prev_model[first:]
    ts_prev_model[0] = ts[0]  # The 2M history starts afresh.
    x_T = diffusion.q_sample(s, init_x0, jnp.full((x_T.shape[0],), ts[0], jnp.int32), x_T)

  def body(carry, inputs):
    x, x0_prev, state, key = carry
    i, t, t_next, t_prev_model = inputs
    key, noise_key, inject_key = jax.random.split(key, 3)
    x0, eps = _predict(s, model_fn, prediction, x, t, clip_x0)
    noise = jax.random.normal(noise_key, x.shape, x.dtype)
    x = entry.update(s, StepInputs(i, len(ts), t, t_next, t_prev_model, x, x0, eps, x0_prev,
                                   noise, state), **options)
    if entry.state is not None:
      x, state = x
    if inject is not None:
      a_next = jnp.where(t_next >= 0, s.alphas_cumprod[jnp.maximum(t_next, 0)], 1.0)
      x = inject(x, jnp.sqrt(a_next), jnp.sqrt(1.0 - a_next), inject_key)
    return (x, x0, state, key), (x if num_snapshots else None)

  xs = (jnp.arange(len(ts)), jnp.asarray(ts), jnp.asarray(ts_next), jnp.asarray(ts_prev_model))
  state = None if entry.state is None else entry.state(x_T)
  (x0, _, _, _), trajectory = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T), state, rng), xs)
  if not num_snapshots:
    return x0
  # Snapshot k shows x after step idx[k]; the first shows the starting noise.
  idx = np.unique(np.linspace(0, len(ts) - 1, num_snapshots - 1).round().astype(int))
  snapshots = jnp.concatenate([x_T[None], trajectory[idx]], axis=0)
  snapshot_t = np.concatenate([[T if init_x0 is None else ts[0]], np.maximum(ts_next[idx], 0)])
  return x0, snapshots, snapshot_t
