"""Schedules, forward process and sampler steps against diffusers and closed forms."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ddpm import diffusion, samplers, schedules

T = 1000


@pytest.mark.parametrize('ours,theirs', [('linear', 'linear'), ('cosine', 'squaredcos_cap_v2')])
def test_schedule_matches_diffusers(ours, theirs):
  ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=theirs)
  s = schedules.make_schedule(ours, T)
  np.testing.assert_allclose(s.betas, ref.betas.numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(s.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)


def test_sigmoid_schedule_matches_float64_reference():
  # Jabri et al. / lucidrains' sigmoid_beta_schedule, written out independently in float64.
  t = np.linspace(0, T, T + 1) / T
  sig = lambda z: 1 / (1 + np.exp(-z))
  ab = (-sig((t * 6 - 3) / 1.0) + sig(3.0)) / (sig(3.0) - sig(-3.0))
  ab = ab / ab[0]
  expected = np.clip(1 - ab[1:] / ab[:-1], 0, 0.999)
  np.testing.assert_allclose(schedules.get_betas('sigmoid', T), expected, rtol=1e-12)


def test_linear_schedule_scales_with_T():
  b = schedules.get_betas('linear', 250)
  assert b[0] == pytest.approx(4e-4) and b[-1] == pytest.approx(0.08)
  # Any T works, and alpha_bar still decays to near zero.
  for name in ('linear', 'cosine', 'sigmoid'):
    s = schedules.make_schedule(name, 37)
    assert s.betas.shape == (37,) and float(s.alphas_cumprod[-1]) < 0.05


def test_unknown_schedule_lists_valid_names():
  with pytest.raises(ValueError, match=r"Unknown noise schedule 'quadratic'.*cosine.*linear.*sigmoid"):
    schedules.get_betas('quadratic', T)


def test_q_sample_and_parameterisations_round_trip():
  s = schedules.make_schedule('cosine', T)
  rng = np.random.RandomState(0)
  x0 = rng.randn(4, 8, 8, 3).astype(np.float32)
  eps = rng.randn(4, 8, 8, 3).astype(np.float32)
  t = jnp.array([0, 10, 500, 999])
  xt = diffusion.q_sample(s, x0, t, eps)
  ab = np.asarray(s.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]
  np.testing.assert_allclose(xt, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, rtol=1e-5, atol=1e-5)
  targets = {'eps': eps, 'x0': x0, 'v': diffusion.velocity(s, x0, t, eps)}
  for prediction, target in targets.items():
    x0_hat, eps_hat = diffusion.to_x0_eps(s, prediction, target, xt, t)
    np.testing.assert_allclose(x0_hat[1:], x0[1:], atol=2e-3)  # t=0 has sigma ~ 0.
    np.testing.assert_allclose(eps_hat[:3], eps[:3], atol=2e-3)  # t=999 has alpha ~ 0.


def test_min_snr_weights():
  s = schedules.make_schedule('linear', T)
  t = jnp.arange(0, T, 37)
  ab = np.asarray(s.alphas_cumprod, np.float64)[np.asarray(t)]
  snr = ab / (1 - ab)
  gamma = 5.0
  expected = {'eps': np.minimum(snr, gamma) / snr, 'x0': np.minimum(snr, gamma),
              'v': np.minimum(snr, gamma) / (snr + 1)}
  for prediction, w in expected.items():
    np.testing.assert_allclose(diffusion.loss_weight(s, t, prediction, gamma), w, rtol=1e-4)
  np.testing.assert_array_equal(diffusion.loss_weight(s, t, 'eps', 0.0), 1.0)


def test_ddpm_step_matches_diffusers():
  ref = DDPMScheduler(num_train_timesteps=T, beta_schedule='linear', clip_sample=True,
                      variance_type='fixed_small')
  s = schedules.make_schedule('linear', T)
  rng = np.random.RandomState(1)
  x = rng.randn(2, 3, 8, 8).astype(np.float32)
  out = rng.randn(2, 3, 8, 8).astype(np.float32)
  for t in (999, 500, 1, 0):
    expected = ref.step(torch.from_numpy(out), t, torch.from_numpy(x),
                        generator=torch.Generator().manual_seed(t)).prev_sample.numpy()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t)).numpy()
    x0, _ = samplers._predict(s, lambda *_: jnp.asarray(out), 'eps', jnp.asarray(x), t, True)
    ours = samplers.ddpm_step(s, x0, jnp.asarray(x), jnp.asarray(t), jnp.asarray(noise))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('spacing', samplers.SPACINGS)
@pytest.mark.parametrize('eta', [0.0, 1.0])
def test_ddim_step_matches_diffusers(spacing, eta):
  S = 50
  ref = DDIMScheduler(num_train_timesteps=T, beta_schedule='linear', timestep_spacing=spacing,
                      clip_sample=True, set_alpha_to_one=True)
  ref.set_timesteps(S)
  ts = samplers.timesteps(T, S, spacing)
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())
  s = schedules.make_schedule('linear', T)
  rng = np.random.RandomState(2)
  x = rng.randn(2, 3, 8, 8).astype(np.float32)
  out = rng.randn(2, 3, 8, 8).astype(np.float32)
  noise = rng.randn(2, 3, 8, 8).astype(np.float32)
  for t in (int(ts[0]), int(ts[S // 2]), int(ts[-1])):
    expected = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=eta,
                        variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
    x0, eps = samplers._predict(s, lambda *_: jnp.asarray(out), 'eps', jnp.asarray(x), t, True)
    ours = samplers.ddim_step(s, x0, eps, jnp.asarray(x), jnp.asarray(t), jnp.asarray(t - T // S),
                              eta, jnp.asarray(noise))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


# --- Whole sampling loops on data whose score is known in closed form --------------------------
# For x_0 ~ N(mu, s^2 I): E[eps | x_t] = sigma_t (x_t - a_t mu) / (a_t^2 s^2 + sigma_t^2), and the
# probability-flow ODE keeps z = (x_t - a_t mu) / sqrt(a_t^2 s^2 + sigma_t^2) constant.
MU, SD = 0.3, 0.5


def gaussian_eps_fn(s):
  def model_fn(x, t):
    a = s.sqrt_alphas_cumprod[t][:, None]
    sig = s.sqrt_one_minus_alphas_cumprod[t][:, None]
    return sig * (x - a * MU) / (a**2 * SD**2 + sig**2)
  return model_fn


def ode_reference(s, x_T, t_first, t_last):
  """Exact ODE from t_first to t_last, then E[x_0 | x_t_last] (what the samplers' last step returns)."""
  ab = np.asarray(s.alphas_cumprod, np.float64)
  z = (x_T - np.sqrt(ab[t_first]) * MU) / np.sqrt(ab[t_first] * SD**2 + 1 - ab[t_first])
  a_l = np.sqrt(ab[t_last])
  return MU + z * a_l * SD**2 / np.sqrt(a_l**2 * SD**2 + 1 - ab[t_last])


@pytest.fixture(scope='module')
def gaussian_setup():
  s = schedules.make_schedule('cosine', T)
  x_T = jax.random.normal(jax.random.PRNGKey(0), (512, 4))
  return s, x_T


def run_sampler(s, x_T, **kw):
  fn = jax.jit(lambda x: samplers.sample(s, gaussian_eps_fn(s), x, jax.random.PRNGKey(1),
                                         clip_x0=False, **kw))
  return np.asarray(fn(x_T), np.float64)


def test_dpm_solver_beats_ddim_at_equal_steps(gaussian_setup):
  s, x_T = gaussian_setup
  errors = {}
  for sampler in ('ddim', 'dpm_solver'):
    for steps in (10, 100):
      ts = samplers.timesteps(T, steps, 'trailing')
      ref = ode_reference(s, np.asarray(x_T, np.float64), ts[0], ts[-1])
      out = run_sampler(s, x_T, sampler=sampler, num_steps=steps, spacing='trailing', eta=0.0)
      errors[sampler, steps] = np.abs(out - ref).max()
  # Both converge to the exact ODE solution (measured: ddim 0.18 -> 0.028, dpm_solver
  # 0.0075 -> 0.0033); the second-order solver is far closer at few steps.
  assert errors['ddim', 100] < 0.2 * errors['ddim', 10]
  assert errors['dpm_solver', 10] < 0.1 * errors['ddim', 10]
  assert errors['dpm_solver', 100] < 0.2 * errors['ddim', 100]


def test_dpm_solver_trajectory_matches_diffusers(gaussian_setup):
  from diffusers import DPMSolverMultistepScheduler  # pylint: disable=g-import-not-at-top
  s, x_T = gaussian_setup
  x_T = np.asarray(x_T[:64], np.float64)
  steps = 10
  ref = DPMSolverMultistepScheduler(
      num_train_timesteps=T, beta_schedule='squaredcos_cap_v2', algorithm_type='dpmsolver++',
      solver_order=2, timestep_spacing='trailing', lower_order_final=True,
      final_sigmas_type='zero')
  ref.set_timesteps(steps)
  np.testing.assert_array_equal(ref.timesteps.numpy(), samplers.timesteps(T, steps, 'trailing'))
  model_fn = gaussian_eps_fn(s)
  x = torch.from_numpy(x_T)
  for t in ref.timesteps:
    eps = model_fn(jnp.asarray(x.numpy(), jnp.float32), jnp.full((len(x_T),), int(t)))
    x = ref.step(torch.from_numpy(np.asarray(eps, np.float64)), t, x).prev_sample
  ours = run_sampler(s, jnp.asarray(x_T, jnp.float32), sampler='dpm_solver', num_steps=steps,
                     spacing='trailing')
  np.testing.assert_allclose(ours, x.numpy(), atol=1e-3)


def test_ddpm_ancestral_samples_have_data_distribution(gaussian_setup):
  s, _ = gaussian_setup
  x_T = jax.random.normal(jax.random.PRNGKey(3), (4096, 4))
  out = run_sampler(s, x_T, sampler='ddpm')
  assert abs(out.mean() - MU) < 0.02
  assert abs(out.std() - SD) < 0.02


def test_ddim_eta1_is_stochastic_and_eta0_deterministic(gaussian_setup):
  s, x_T = gaussian_setup
  a = run_sampler(s, x_T, sampler='ddim', num_steps=20, eta=0.0)
  model_fn = gaussian_eps_fn(s)
  b = np.asarray(samplers.sample(s, model_fn, x_T, jax.random.PRNGKey(9), sampler='ddim',
                                 num_steps=20, eta=0.0, clip_x0=False))
  np.testing.assert_allclose(a, b, atol=1e-6)  # eta=0: the key does not matter.
  c = run_sampler(s, x_T, sampler='ddim', num_steps=20, eta=1.0)
  assert np.abs(a - c).mean() > 0.05


def test_snapshots_for_progressive_figure(gaussian_setup):
  s, x_T = gaussian_setup
  x0, snaps, snap_t = samplers.sample(s, gaussian_eps_fn(s), x_T[:5], jax.random.PRNGKey(0),
                                      sampler='ddim', num_steps=50, num_snapshots=10)
  assert snaps.shape == (10, 5, 4) and len(snap_t) == 10
  np.testing.assert_array_equal(snaps[0], x_T[:5])       # Starts from the noise...
  np.testing.assert_allclose(snaps[-1], x0, atol=1e-6)   # ...ends at the sample.
  assert list(snap_t) == sorted(snap_t, reverse=True)


def test_bad_sampler_arguments():
  with pytest.raises(ValueError, match='Unknown sampler'):
    samplers.sample(schedules.make_schedule('linear', 10), lambda x, t: x, jnp.zeros((1, 2)),
                    jax.random.PRNGKey(0), sampler='lms')
  with pytest.raises(ValueError, match='spacing'):
    samplers.timesteps(T, 10, 'log')
  with pytest.raises(ValueError, match='num_steps'):
    samplers.timesteps(T, 0)


@pytest.mark.parametrize('strength', [0.0, 0.3, 0.7, 1.0])
def test_sdedit_start_matches_diffusers_img2img(gaussian_setup, strength):
  """init_x0 + strength: diffusers' img2img timesteps[t_start:], noised to the first of them."""
  s, x_T = gaussian_setup
  noise = np.asarray(x_T[:16], np.float32)
  x0 = np.random.RandomState(5).randn(*noise.shape).astype(np.float32) * SD + MU
  steps = 20
  ref = DDIMScheduler(num_train_timesteps=T, beta_schedule='squaredcos_cap_v2', clip_sample=False,
                      set_alpha_to_one=True)
  ref.set_timesteps(steps)
  start = steps - min(int(steps * strength), steps)
  model_fn = gaussian_eps_fn(s)
  x = torch.from_numpy(x0)
  if start < steps:
    x = ref.add_noise(x, torch.from_numpy(noise), ref.timesteps[start:start + 1])
  for t in ref.timesteps[start:]:
    eps = model_fn(jnp.asarray(x.numpy()), jnp.full((len(x0),), int(t)))
    x = ref.step(torch.from_numpy(np.asarray(eps)), t, x).prev_sample
  ours = samplers.sample(s, model_fn, jnp.asarray(noise), jax.random.PRNGKey(0), sampler='ddim',
                         num_steps=steps, clip_x0=False, init_x0=jnp.asarray(x0),
                         strength=strength)
  np.testing.assert_allclose(ours, x.numpy(), atol=1e-4)
  if strength == 0.0:
    np.testing.assert_array_equal(ours, x0)


# --- The sigma samplers against diffusers' schedulers (full trajectories) ----------------------

def _toy_model(x, t):
  """A smooth stand-in for a network, defined for fractional timesteps."""
  return jnp.tanh(0.7 * x) + 0.3 * jnp.sin(jnp.asarray(t, jnp.float32) / 150.0)[:, None] * x


def _diffusers_scheduler(name, karras, spacing, prediction):
  import diffusers  # pylint: disable=g-import-not-at-top
  kw = dict(num_train_timesteps=T, beta_schedule='scaled_linear', beta_start=0.00085,
            beta_end=0.012, prediction_type='epsilon' if prediction == 'eps' else 'v_prediction')
  if name == 'dpmpp_2m_karras':
    return diffusers.DPMSolverMultistepScheduler(
        **kw, algorithm_type='dpmsolver++', solver_order=2, use_karras_sigmas=True,
        final_sigmas_type='zero', lower_order_final=True)
  cls = {'euler': diffusers.EulerDiscreteScheduler, 'heun': diffusers.HeunDiscreteScheduler,
         'euler_ancestral': diffusers.EulerAncestralDiscreteScheduler}[name]
  if karras:
    kw['use_karras_sigmas'] = True
  return cls(**kw, timestep_spacing=spacing)


def _feed_our_noise(ref, rng, steps, shape, monkeypatch):
  """Makes diffusers' ancestral step draw our loop's per-step noise: each step splits the
  carried key into (key, noise_key, inject_key) and draws N(0, I) from noise_key."""
  noises, key = [], rng
  for _ in range(steps):
    key, noise_key, _ = jax.random.split(key, 3)
    noises.append(torch.from_numpy(np.asarray(jax.random.normal(noise_key, shape))))
  module = sys.modules[type(ref).__module__]
  monkeypatch.setattr(module, 'randn_tensor', lambda *a, **k: noises.pop(0))
  return noises


@pytest.mark.parametrize('name,karras,spacing,prediction,steps', [
    ('euler', False, 'linspace', 'eps', 20),
    ('euler', True, 'leading', 'v', 12),
    ('heun', False, 'trailing', 'eps', 10),
    ('heun', True, 'linspace', 'eps', 8),
    ('euler_ancestral', False, 'leading', 'eps', 15),
    ('euler_ancestral', False, 'linspace', 'v', 20),
    ('euler_ancestral', False, 'trailing', 'eps', 10),
    ('dpmpp_2m_karras', False, 'linspace', 'eps', 20),
    ('dpmpp_2m_karras', False, 'linspace', 'v', 12),
])
def test_sigma_samplers_match_diffusers_trajectories(name, karras, spacing, prediction, steps,
                                                     monkeypatch):
  s = schedules.make_schedule('scaled_linear', T)
  ref = _diffusers_scheduler(name, karras, spacing, prediction)
  ref.set_timesteps(steps)
  x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (16, 4)), np.float32)
  rng = jax.random.PRNGKey(5)
  noises = (_feed_our_noise(ref, rng, steps, x_T.shape, monkeypatch)
            if name == 'euler_ancestral' else [])
  x = torch.from_numpy(x_T) * ref.init_noise_sigma
  for t in ref.timesteps:
    inp = ref.scale_model_input(x, t)
    out = _toy_model(jnp.asarray(inp.numpy()), jnp.full((len(x_T),), float(t)))
    x = ref.step(torch.from_numpy(np.asarray(out)), t, x).prev_sample
  assert not noises  # One draw per step, all of them used.
  ours = samplers.sample(s, _toy_model, jnp.asarray(x_T), rng, sampler=name, num_steps=steps,
                         spacing=spacing, prediction=prediction, karras=karras,
                         clip_x0=False)  # diffusers' schedulers do not clip (SD's latents).
  want = x.numpy()
  np.testing.assert_allclose(np.asarray(ours), want, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_sd_samplers_reach_the_data_distribution():
  s = schedules.make_schedule('scaled_linear', T)  # Stable Diffusion's, what they are for.
  x_T = jax.random.normal(jax.random.PRNGKey(3), (4096, 4))
  exact = gaussian_eps_fn(s)
  # The sigma samplers call the model at fractional timesteps; the closed form is tabulated.
  model_fn = lambda x, t: exact(x, jnp.round(t).astype(jnp.int32))
  # (Euler ancestral: test_euler_ancestral_samples_have_their_exact_distribution.)
  for name, steps in (('euler', 30), ('heun', 30), ('dpmpp_2m_karras', 30), ('unipc', 20)):
    out = np.asarray(jax.jit(lambda x, name=name, steps=steps: samplers.sample(
        s, model_fn, x, jax.random.PRNGKey(1), sampler=name, num_steps=steps,
        clip_x0=False))(x_T), np.float64)
    assert abs(out.mean() - MU) < 0.05 and abs(out.std() - SD) < 0.05, (name, out.mean(), out.std())


def _euler_ancestral_gaussian(sigmas, init):
  """(mean, std) of Euler ancestral's samples for x_0 ~ N(MU, SD^2) with the exact denoiser
  D(x, s) = MU + SD^2 / (SD^2 + s^2) (x - MU), in float64 from the sigma table alone: each step
  x' = x + (s_down - s) (x - D) / s + s_up z, with k-diffusion's s_up = sqrt(s'^2 (s^2 - s'^2) /
  s^2) and s_down = sqrt(s'^2 - s_up^2), is linear in x plus Gaussian noise, so the samples are
  exactly Gaussian with these moments."""
  m, v = -MU, init**2  # Of x - MU; x starts as init * N(0, I).
  for a, b in zip(sigmas[:-1], sigmas[1:]):
    up = np.sqrt(b**2 * (a**2 - b**2) / a**2)
    gain = 1 + (np.sqrt(b**2 - up**2) - a) * a / (SD**2 + a**2)
    m, v = gain * m, gain**2 * v + up**2
  return MU + m, np.sqrt(v)


@pytest.mark.parametrize('steps', [30, 100])
def test_euler_ancestral_samples_have_their_exact_distribution(steps):
  """Euler ancestral's first-order error shrinks the spread (std 0.431 at 30 steps, 0.471 at
  100, 0.488 at 300 for SD = 0.5): a correct sampler gives exactly that, so its samples' moments
  must match _euler_ancestral_gaussian on diffusers' sigma table to within 4 standard errors
  (about 0.01 on the std). Without the noise term the std is 0.02 at 100 steps, with
  s_down = s' 1.31. (An error that only changes how much noise each step swaps, e.g. s_up
  scaled by 0.9, gives nearly the same moments: the trajectory parity catches those.)"""
  import diffusers  # pylint: disable=g-import-not-at-top
  s = schedules.make_schedule('scaled_linear', T)
  ref = diffusers.EulerAncestralDiscreteScheduler(
      num_train_timesteps=T, beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012,
      timestep_spacing='leading')
  ref.set_timesteps(steps)
  mean, std = _euler_ancestral_gaussian(ref.sigmas.numpy().astype(np.float64),
                                        float(ref.init_noise_sigma))
  x_T = jax.random.normal(jax.random.PRNGKey(3), (4096, 4))
  # 'leading' timesteps are integers: the tabulated closed form is the exact denoiser there.
  exact = gaussian_eps_fn(s)
  model_fn = lambda x, t: exact(x, jnp.round(t).astype(jnp.int32))
  out = np.asarray(jax.jit(lambda x: samplers.sample(
      s, model_fn, x, jax.random.PRNGKey(1), sampler='euler_ancestral',
      num_steps=steps, spacing='leading', clip_x0=False))(x_T), np.float64)
  se = std / np.sqrt(out.size)  # Of the mean; the std's is se / sqrt(2).
  assert abs(out.mean() - mean) < 4 * se, (out.mean(), mean)
  assert abs(out.std() - std) < 4 * se / np.sqrt(2), (out.std(), std)



@pytest.mark.parametrize('name,strength,inpaint', [
    ('euler', 0.6, False), ('heun', 0.7, True), ('dpmpp_2m_karras', 0.5, True),
    ('euler', 1.0, True), ('ddim', 0.6, True), ('unipc', 0.7, True),
    ('euler_ancestral', 0.6, True),
])
def test_image_to_image_and_inpainting_match_diffusers_pipelines(name, strength, inpaint,
                                                                  monkeypatch):
  """The loops of diffusers' img2img and inpainting pipelines (4-channel U-Net), written out
  here around diffusers' own schedulers (the pipelines themselves: test_latent_pipeline): start
  int(S * strength) steps from the end at the picture noised with the initial noise
  (set_begin_index, add_noise), and after every scheduler step re-impose the kept region
  noised to the next step's level with that same noise."""
  import diffusers  # pylint: disable=g-import-not-at-top
  steps, n = 10, 16
  s = schedules.make_schedule('scaled_linear', T)
  sd = dict(num_train_timesteps=T, beta_schedule='scaled_linear', beta_start=0.00085,
            beta_end=0.012)
  if name == 'ddim':
    ref = diffusers.DDIMScheduler(**sd, clip_sample=False, set_alpha_to_one=True)
  elif name == 'unipc':
    ref = diffusers.UniPCMultistepScheduler(**sd, timestep_spacing='leading')
  else:
    ref = _diffusers_scheduler(name, False, 'leading', 'eps')
  ref.set_timesteps(steps)
  rng = np.random.default_rng(0)
  x_T, init = (rng.standard_normal((n, 4)).astype(np.float32) for _ in range(2))
  keep = (np.arange(4) < 2).astype(np.float32)[None].repeat(n, 0)  # Keep 2 of 4 "pixels".
  tt = lambda a: torch.from_numpy(np.array(a))
  first = steps - min(int(steps * strength), steps)
  noises = (_feed_our_noise(ref, jax.random.PRNGKey(0), steps - first, (n, 4), monkeypatch)
            if name == 'euler_ancestral' else [])
  timesteps = ref.timesteps[first * ref.order:]
  if hasattr(ref, 'set_begin_index'):
    ref.set_begin_index(first * ref.order)
  if strength < 1.0:
    x = ref.add_noise(tt(init), tt(x_T), timesteps[:1])
  else:
    x = tt(x_T) * ref.init_noise_sigma
  for i, t in enumerate(timesteps):
    out = _toy_model(jnp.asarray(ref.scale_model_input(x, t).numpy()),
                     jnp.full((n,), float(t)))
    x = ref.step(tt(out), t, x).prev_sample
    if inpaint:
      known = tt(init)
      if i < len(timesteps) - 1:
        known = ref.add_noise(known, tt(x_T), timesteps[i + 1:i + 2])
      x = tt(keep) * known + (1 - tt(keep)) * x
  assert not noises
  ours = samplers.sample(
      s, _toy_model, jnp.asarray(x_T), jax.random.PRNGKey(0), sampler=name, num_steps=steps,
      spacing='leading', clip_x0=False, init_x0=jnp.asarray(init) if strength < 1 else None,
      strength=strength,
      inject=samplers.reimposing(jnp.asarray(init), jnp.asarray(keep), jnp.asarray(x_T))
      if inpaint else None)
  want = x.numpy()
  np.testing.assert_allclose(np.asarray(ours), want, atol=1e-4 * max(1.0, np.abs(want).max()))
  if inpaint:
    np.testing.assert_array_equal(np.asarray(ours)[:, :2], init[:, :2])


@pytest.mark.parametrize('name,spacing,prediction,steps', [
    ('unipc', 'leading', 'eps', 10), ('unipc', 'linspace', 'v', 7),
    ('unipc', 'trailing', 'eps', 20), ('dpm_solver', 'leading', 'eps', 12),
    ('dpm_solver', 'linspace', 'v', 9),
])
def test_multistep_solvers_match_diffusers_trajectories(name, spacing, prediction, steps):
  """UniPC (bh2, order 2) and DPM-Solver++(2M) against diffusers' UniPCMultistepScheduler and
  DPMSolverMultistepScheduler, with their own timestep rules (S + 1 points for leading and
  linspace) and SD's betas, steps_offset and lower_order_final."""
  import diffusers  # pylint: disable=g-import-not-at-top
  s = schedules.make_schedule('scaled_linear', T)
  kw = dict(num_train_timesteps=T, beta_schedule='scaled_linear', beta_start=0.00085,
            beta_end=0.012, prediction_type='epsilon' if prediction == 'eps' else 'v_prediction',
            timestep_spacing=spacing, steps_offset=1 if spacing == 'leading' else 0)
  if name == 'unipc':
    ref = diffusers.UniPCMultistepScheduler(**kw)
  else:
    ref = diffusers.DPMSolverMultistepScheduler(**kw, algorithm_type='dpmsolver++')
  ref.set_timesteps(steps)
  np.testing.assert_array_equal(ref.timesteps.numpy(), samplers.multistep_timesteps(
      T, steps, spacing, kw['steps_offset']))
  x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (16, 4)), np.float32)
  x = torch.from_numpy(x_T)
  for t in ref.timesteps:
    out = _toy_model(jnp.asarray(x.numpy()), jnp.full((len(x_T),), float(t)))
    x = ref.step(torch.from_numpy(np.asarray(out)), t, x).prev_sample
  ours = samplers.sample(s, _toy_model, jnp.asarray(x_T), jax.random.PRNGKey(0), sampler=name,
                         num_steps=steps, spacing=spacing, prediction=prediction,
                         steps_offset=kw['steps_offset'], clip_x0=False)
  want = x.numpy()
  np.testing.assert_allclose(np.asarray(ours), want, atol=1e-4 * max(1.0, np.abs(want).max()))
