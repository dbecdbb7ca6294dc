"""Samplers on the VP chain's integer timesteps: DDPM ancestral (all T steps), DDIM (S steps,
eta), DPM-Solver++(2M) and UniPC-2 (bh2): their step maths, their registry entries and the one
`lax.scan` loop they share.

A VP sampler is its inference timesteps, the timestep each step goes to, and the update
x_t -> x_{t_next} (optionally carrying more history as state); `VPSampler.run` calls the model
once per step and hands the update a `StepInputs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm import diffusion
from ddpm.samplers.base import ModelFn, Run, Sampler
from ddpm.samplers.spacing import multistep_timesteps, timesteps
from ddpm.schedules import Schedule


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


# --- The entries and their loop ---------------------------------------------------------------

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
  state: Any = None     # What the sampler's update returned last step (VPSampler.state).


@dataclasses.dataclass(frozen=True)
class VPSampler(Sampler):
  """A sampler on integer timesteps t of x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
  timesteps: Callable[[int, int, str, int], np.ndarray]  # (T, S, spacing, steps_offset) -> ts.
  next_timesteps: Callable[[np.ndarray, int], np.ndarray]  # (ts, T) -> next ts (< 0: the end).
  update: Callable[..., jnp.ndarray]  # (schedule, StepInputs, **options) -> x.
  # A sampler that keeps more history: state(x_T) is its initial state, and update returns
  # (x, state) instead of x.
  state: Callable[[jnp.ndarray], Any] | None = None

  def run(self, s: Schedule, model_fn: ModelFn, x_T: jnp.ndarray, rng: jax.Array, run: Run):
    T = s.num_timesteps
    prediction, clip_x0, num_snapshots = run.prediction, run.clip_x0, run.num_snapshots
    inject, init_x0, first = run.inject, run.init_x0, run.first
    ts = self.timesteps(T, run.num_steps, run.spacing, run.steps_offset)
    ts_next = self.next_timesteps(ts, T)
    options = dict(eta=run.eta, ddpm_variance=run.ddpm_variance,
                   final_alpha_cumprod=run.final_alpha_cumprod)
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
      x = self.update(s, StepInputs(i, len(ts), t, t_next, t_prev_model, x, x0, eps, x0_prev,
                                    noise, state), **options)
      if self.state is not None:
        x, state = x
      if inject is not None:
        a_next = jnp.where(t_next >= 0, s.alphas_cumprod[jnp.maximum(t_next, 0)], 1.0)
        x = inject(x, jnp.sqrt(a_next), jnp.sqrt(1.0 - a_next), inject_key)
      return (x, x0, state, key), (x if num_snapshots else None)

    xs = (jnp.arange(len(ts)), jnp.asarray(ts), jnp.asarray(ts_next), jnp.asarray(ts_prev_model))
    state = None if self.state is None else self.state(x_T)
    (x0, _, _, _), trajectory = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T), state, rng), xs)
    if not num_snapshots:
      return x0
    # Snapshot k shows x after step idx[k]; the first shows the starting noise.
    idx = np.unique(np.linspace(0, len(ts) - 1, num_snapshots - 1).round().astype(int))
    snapshots = jnp.concatenate([x_T[None], trajectory[idx]], axis=0)
    snapshot_t = np.concatenate([[T if init_x0 is None else ts[0]], np.maximum(ts_next[idx], 0)])
    return x0, snapshots, snapshot_t


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


SAMPLERS: dict[str, VPSampler] = {
    # Ancestral DDPM always runs all T steps.
    'ddpm': VPSampler(lambda T, S, spacing, offset: np.arange(T - 1, -1, -1, dtype=np.int32),
                      _following, _ddpm_update, full_chain=True),
    # diffusers' DDIM rule for the step after t: t - T//S (also with trailing spacing).
    'ddim': VPSampler(timesteps, lambda ts, T: ts - T // len(ts), _ddim_update),
    'dpm_solver': VPSampler(multistep_timesteps, _following, _dpm_solver_update),
    'unipc': VPSampler(multistep_timesteps, _following, _unipc_update,
                       state=lambda x: (jnp.zeros_like(x), jnp.zeros_like(x), jnp.int32(0))),
}
