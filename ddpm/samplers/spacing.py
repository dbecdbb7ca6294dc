"""Where the steps go: inference timesteps and the sigma-space samplers' sigma/timestep tables.

Timestep spacings follow diffusers' schedulers (Lin et al. 2023, table 2); for DDIM:
  leading   t_i = i * (T // S) (+ offset), descending: 980, 960, ..., 0 for S=50
  trailing  t_i = round(T - i * T/S) - 1: 999, 979, ..., 19
  linspace  round(linspace(0, T - 1, S)), descending.
The multistep solvers (dpm_solver, unipc) split the range into S + 1 points for leading and
linspace and drop the last, as diffusers' DPMSolverMultistep and UniPC schedulers do.

Karras et al. (2022) write the forward process as x = x0 + sigma * eps with
sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod), i.e. x = x_t / alpha_t; the sigma tables
here are those of diffusers' Euler*, Heun and DPMSolverMultistep(use_karras_sigmas) schedulers.
(Not named `timesteps.py`: `ddpm.samplers.timesteps` is the function below.)
"""

from __future__ import annotations

import math

import numpy as np

from ddpm.configs.default import SPACINGS  # Choice lists live with the config.
from ddpm.schedules import Schedule


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


# --- Sigma tables ---------------------------------------------------------------------------

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


def discrete_sigmas(s: Schedule, num_steps: int, spacing: str = 'linspace', karras: bool = False,
                    steps_offset: int = 0):
  """(sigmas [S+1] ending in 0, model timesteps [S] (float), initial noise scale) as diffusers'
  Euler*/Heun set_timesteps: float timesteps by `spacing`, sigmas interpolated; Karras sigmas
  between those ends."""
  T, S = s.num_timesteps, num_steps
  train_sigmas = _train_sigmas(s)
  log_sigmas = np.log(train_sigmas)
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


def multistep_karras_sigmas(s: Schedule, num_steps: int, spacing: str = 'linspace',
                            karras: bool = True, steps_offset: int = 0):  # pylint: disable=W0613
  """The same triple as DPMSolverMultistepScheduler(use_karras_sigmas=True): Karras sigmas over
  the whole training range, timesteps rounded, initial noise scale 1 (it steps on x_t itself);
  spacing, karras and steps_offset do not apply."""
  train_sigmas = _train_sigmas(s)
  log_sigmas = np.log(train_sigmas)
  sigmas = _karras(train_sigmas[-1], train_sigmas[0], num_steps)
  ts = _sigma_to_t(sigmas, log_sigmas).round()
  return np.append(sigmas, 0.0), ts, 1.0


def sigma_schedule(s: Schedule, num_steps: int, spacing: str = 'linspace', karras: bool = False,
                   steps_offset: int = 0, sampler: str = 'euler'):
  """(sigmas [S+1] ending in 0, model timesteps [S] (float), initial noise scale) of a sigma
  sampler: 'dpmpp_2m_karras' `multistep_karras_sigmas`, the others `discrete_sigmas` (the
  registry's entries carry their table themselves; this is the by-name view)."""
  if sampler == 'dpmpp_2m_karras':
    return multistep_karras_sigmas(s, num_steps)
  return discrete_sigmas(s, num_steps, spacing, karras, steps_offset)
