"""Noise schedules: betas_t for t = 0 .. T-1, and the quantities derived from them.

Computed in float64 numpy (as diffusers and the DDPM code do) and stored as
float32 device arrays for the train step and samplers.
"""

from __future__ import annotations

import math
from typing import Callable

import flax
import jax.numpy as jnp
import numpy as np


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """DDPM (Ho et al. 2020): linear in t; endpoints scaled by 1000/T so any T keeps the same
  total noise (as in the HW6 code and improved-diffusion)."""
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> np.ndarray:
  """Stable Diffusion's schedule: linear in sqrt(beta)."""
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64)**2


def _betas_from_alpha_bar(alpha_bar: Callable[[np.ndarray], np.ndarray], num_timesteps: int,
                          max_beta: float = 0.999) -> np.ndarray:
  t = np.arange(num_timesteps, dtype=np.float64)
  betas = 1.0 - alpha_bar((t + 1) / num_timesteps) / alpha_bar(t / num_timesteps)
  return np.minimum(betas, max_beta)


def cosine_betas(num_timesteps: int, s: float = 0.008) -> np.ndarray:
  """Nichol & Dhariwal (2021): alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas <= 0.999."""
  return _betas_from_alpha_bar(
      lambda u: np.cos((u + s) / (1 + s) * math.pi / 2)**2, num_timesteps)


def sigmoid_betas(num_timesteps: int, start: float = -3.0, end: float = 3.0,
                  tau: float = 1.0) -> np.ndarray:
  """Jabri et al. (2022) / Chen (2023): alpha_bar follows a reversed sigmoid of t."""
  sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
  v_start, v_end = sigmoid(start / tau), sigmoid(end / tau)
  alpha_bar = lambda u: (v_end - sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)
  t = np.linspace(0.0, 1.0, num_timesteps + 1, dtype=np.float64)
  ab = alpha_bar(t) / alpha_bar(t[:1])
  return np.clip(1.0 - ab[1:] / ab[:-1], 0.0, 0.999)


SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
    'linear': linear_betas,
    'scaled_linear': scaled_linear_betas,
    'cosine': cosine_betas,
    'sigmoid': sigmoid_betas,
}


def get_betas(name: str, num_timesteps: int) -> np.ndarray:
  if name not in SCHEDULES:
    raise ValueError(
        f'Unknown noise schedule {name!r}; valid schedules: {", ".join(sorted(SCHEDULES))}.')
  if num_timesteps < 1:
    raise ValueError(f'num_timesteps must be >= 1, got {num_timesteps}.')
  return SCHEDULES[name](num_timesteps)


@flax.struct.dataclass
class Schedule:
  """All per-timestep constants of the forward and reverse processes, shape [T]."""
  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  posterior_variance: jnp.ndarray            # beta~_t of q(x_{t-1} | x_t, x_0).
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef1: jnp.ndarray          # Multiplies x_0.
  posterior_mean_coef2: jnp.ndarray          # Multiplies x_t.

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def make_schedule(name: str, num_timesteps: int) -> Schedule:
  return from_betas(get_betas(name, num_timesteps))


def from_betas(betas: np.ndarray) -> Schedule:
  """The Schedule of any beta sequence (e.g. a diffusers scheduler_config.json's)."""
  betas = np.asarray(betas, np.float64)
  num_timesteps = len(betas)
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  # beta~_0 = 0: the log is clipped to beta~_1 as in the DDPM code.
  log_var = np.log(np.append(posterior_variance[1:2], posterior_variance[1:])
                   if num_timesteps > 1 else np.maximum(posterior_variance, 1e-20))
  arrays = dict(
      betas=betas,
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=log_var,
      posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
  )
  return Schedule(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})
