"""Samplers: DDPM ancestral (all T steps), DDIM (S steps, eta), DPM-Solver++(2M), UniPC, and
diffusers' Euler, Euler ancestral, Heun and DPM++(2M) Karras (stepping in sigma).

Each sampler is a pure step function plus a loop written with `lax.scan`, so
the whole trajectory compiles into one XLA program: no Python per step.

`model_fn(x_t, t) -> model output` is any closure over parameters (and, for
latent diffusion, over the conditioning and guidance); `prediction` says
whether it predicts eps, x0 or v.

The package:
  spacing.py  timestep spacings (`timesteps`, `multistep_timesteps`) and the sigma tables
  vp.py       DDPM, DDIM, DPM-Solver++(2M), UniPC: step maths, entries, the timestep loop
  karras.py   Euler, Euler ancestral, Heun, DPM++(2M) Karras: steps, entries, the sigma loop
  base.py     the entry type (`Sampler`: a sampler carrying its own `run`) and `Run`
  here        the `SAMPLERS` registry, `sample`, `reimposing`, `options_from_config`
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm.configs.default import SIGMA_SAMPLERS, SPACINGS  # Choice lists live with the config.
from ddpm.samplers import karras, vp
from ddpm.samplers.base import ModelFn, Run, Sampler
from ddpm.samplers.karras import SigmaSampler, SigmaStep
from ddpm.samplers.spacing import (discrete_sigmas, multistep_karras_sigmas,
                                   multistep_timesteps, sigma_schedule, timesteps)
from ddpm.samplers.vp import (StepInputs, VPSampler, ddim_step, ddpm_step, dpm_solver_2m_step,
                              unipc_step)
from ddpm.samplers.vp import _predict  # As ddpm.samplers._predict: tests/test_ddpm_math.py's.
from ddpm.schedules import Schedule

__all__ = [
    'SAMPLERS', 'SIGMA_SAMPLERS', 'SPACINGS', 'ModelFn', 'Run', 'Sampler', 'SigmaSampler',
    'SigmaStep', 'StepInputs', 'VPSampler', 'ddim_step', 'ddpm_step', 'discrete_sigmas',
    'dpm_solver_2m_step', 'multistep_karras_sigmas', 'multistep_timesteps',
    'options_from_config', 'reimposing', 'sample', 'sigma_schedule', 'timesteps', 'unipc_step',
]

# --- The registry ---------------------------------------------------------------
#
# Every sampler is an entry that carries its own loop (`Sampler.run`). Adding one touches
# vp.py or karras.py (its step and entry) and the config's documented choices only: `sample`
# and every caller look samplers up here.

SAMPLERS: dict[str, Sampler] = {**vp.SAMPLERS, **karras.SAMPLERS}


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
    S = T if entry.full_chain else num_steps
    first = S - min(int(S * strength), S)
    if first == S:
      return (init_x0, init_x0[None], np.array([0])) if num_snapshots else init_x0
  return entry.run(s, model_fn, x_T, rng, Run(
      num_steps=num_steps, spacing=spacing, steps_offset=steps_offset, prediction=prediction,
      clip_x0=clip_x0, num_snapshots=num_snapshots, karras=karras, eta=eta,
      ddpm_variance=ddpm_variance, final_alpha_cumprod=final_alpha_cumprod, inject=inject,
      init_x0=init_x0, first=first))
