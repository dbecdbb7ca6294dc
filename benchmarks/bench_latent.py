"""latent/ speed against diffusers (PyTorch), side by side in one run.

  python benchmarks/bench_latent.py [--batch 16] [--repeats 5] [--rows abc] [--write]

(a) stage-2 train step of `ldm_anime_text` (text encoder + conditional U-Net on
    16x16x4 latents, condition dropout, Adam, EMA) against diffusers'
    UNet2DConditionModel of the same architecture plus a torch Transformer
    text encoder of the same size, float32;
(b) guided DDIM-50 sampling (one batched cond/uncond pass per step) against
    the same torch modules in a plain loop with diffusers' DDIMScheduler;
(c) stage-1 autoencoder (vae_anime, 64x64) encode + decode against diffusers'
    AutoencoderKL.
Prints ratios (> 1: we are faster); --write replaces the `## latent` section
of benchmarks/RESULTS.md.
"""

import argparse
import platform
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.torch_compat import patch_torchvision  # pylint: disable=wrong-import-position

patch_torchvision()
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # pylint: disable=wrong-import-position

from bench_ddpm import (layer_calls, lowered_flops, timed, torch_on, with_kernel,  # pylint: disable=wrong-import-position
                        write_section, xla_flops)
from common import loop, mesh as mesh_lib  # pylint: disable=wrong-import-position
from ddpm import train as ddpm_train  # pylint: disable=wrong-import-position
from latent.ldm import conditions, sampler, text, train  # pylint: disable=wrong-import-position
from latent.vae import autoencoder, state as vae_state  # pylint: disable=wrong-import-position
from latent.configs import ldm_anime_text, vae_anime  # pylint: disable=wrong-import-position

LATENT, CHANNELS, FACTOR = 16, 4, 4


def ldm_setup(batch, dtype='float32'):
  config = ldm_anime_text.get_config()
  config.model.dtype = dtype
  config.train.batch_size = batch
  c = config.conditioning
  tokenizer = text.Tokenizer.from_captions(['blonde long hair and blue eyes'] * 2, c.max_length)
  tokenizer = text.Tokenizer(tokenizer.vocab + [f'w{i}' for i in range(40)], c.max_length)
  conds = conditions.Conditions('text', tokenizer)
  stage1 = types.SimpleNamespace(factor=FACTOR, latent_channels=CHANNELS, scale_factor=1.0)
  model = train.build_model(config, conds, stage1)
  return config, model, stage1, tokenizer


def ours_train_fn(batch, dtype='float32'):
  """(fn running one train step to completion, [the current state], config, model,
  lower(): the step lowered for the current state, the step's `layer_calls`)."""
  config, model, stage1, tokenizer = ldm_setup(batch, dtype)
  mesh = mesh_lib.make_mesh()
  schedule, tx = ddpm_train.build_schedule(config), ddpm_train.make_optimizer(config)
  state = jax.jit(lambda: train.init_state(config, model, tx),
                  out_shardings=mesh_lib.replicated(mesh))()
  step = loop.jit_step(lambda s, b: train.train_step(
      s, b, None, config=config, model=model, schedule=schedule, tx=tx, stage1=stage1,
      rules=ddpm_train.rules_of(config)), mesh)
  batch_np = latent_batch(tokenizer, batch)
  calls = layer_calls(step, state, mesh_lib.shard_batch(batch_np, mesh))
  ours, box = stepper(step, state, batch_np, mesh)
  lower = lambda: step.lower(box[0], mesh_lib.shard_batch(batch_np, mesh))
  return ours, box, config, model, lower, calls


def bench_ours_train(batch, repeats, dtype='float32', with_flops=False):
  ours, box, config, model, lower, _ = ours_train_fn(batch, dtype)
  seconds = timed(ours, repeats)
  n_params = sum(x.size for x in jax.tree.leaves(box[0].params))
  return seconds, n_params, config, model, box[0].params, lowered_flops(lower()) if with_flops else 0.0


def latent_batch(tokenizer, batch, prompt='blonde long hair and blue eyes'):
  """A stage-2 batch as the latent cache gives it: ids, posterior means and stds."""
  rng = np.random.RandomState(0)
  ids, _ = tokenizer.encode([prompt] * batch)
  return {'ids': ids,
          'mean': rng.randn(batch, 2, LATENT, LATENT, CHANNELS).astype(np.float32),
          'std': np.full((batch, 2, LATENT, LATENT, CHANNELS), 0.1, np.float32)}


def stepper(step, state, batch_np, mesh):
  """(fn running one step to completion, [the current state])."""
  box = [state]

  def run():
    box[0], _ = step(box[0], mesh_lib.shard_batch(batch_np, mesh))
    jax.block_until_ready(box[0])  # The whole update (Adam, EMA), not just the loss.

  return run, box


def torch_modules(config, model):
  m, c = config.model, config.conditioning
  u = model.unet
  attn = u.attention_levels()
  heads = tuple(ch // m.head_dim for ch in m.block_out_channels)
  unet = UNet2DConditionModel(
      sample_size=u.sample_size, in_channels=CHANNELS, out_channels=CHANNELS,
      block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
      down_block_types=tuple('CrossAttnDownBlock2D' if a else 'DownBlock2D' for a in attn),
      up_block_types=tuple('CrossAttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attn)),
      norm_num_groups=m.norm_groups, cross_attention_dim=c.width, attention_head_dim=heads,
      use_linear_projection=True)
  layer = torch.nn.TransformerEncoderLayer(c.width, c.heads, 4 * c.width, dropout=0.0,
                                           activation='gelu', batch_first=True, norm_first=True)
  text_encoder = torch.nn.Sequential()
  text_encoder.embed = torch.nn.Embedding(64, c.width)
  text_encoder.encoder = torch.nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)
  text_encoder.norm = torch.nn.LayerNorm(c.width)
  return unet, text_encoder


def encode_text(text_encoder, ids):
  return text_encoder.norm(text_encoder.encoder(text_encoder.embed(ids)))


def torch_train_fn(config, model, batch, device='cpu', dtype='float32'):
  """(fn running one diffusers train step, (unet, text_encoder))."""
  autocast, sync = torch_on(device, dtype)
  unet, text_encoder = (m.to(device) for m in torch_modules(config, model))
  params = list(unet.parameters()) + list(text_encoder.parameters())
  opt = torch.optim.Adam(params, lr=1e-4)
  sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule='scaled_linear')
  z0 = torch.randn(batch, CHANNELS, LATENT, LATENT, device=device)
  ids = torch.randint(2, 40, (batch, config.conditioning.max_length), device=device)

  def theirs():
    t = torch.randint(0, 1000, (batch,), device=device)
    noise = torch.randn_like(z0)
    with autocast():
      context = encode_text(text_encoder, ids)
      out = unet(sched.add_noise(z0, noise, t), t, encoder_hidden_states=context).sample
    loss = torch.nn.functional.mse_loss(out.float(), noise)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sync()

  return theirs, (unet, text_encoder)


def bench_torch_train(config, model, batch, repeats, device='cpu', dtype='float32'):
  theirs, modules = torch_train_fn(config, model, batch, device, dtype)
  return timed(theirs, repeats), modules


def ours_sampling_fn(config, model, params, batch):
  """(fn sampling to completion, `layer_calls` of one guided network call)."""
  config.sample.num_steps = 50
  stage1 = types.SimpleNamespace(latent_channels=CHANNELS, scale_factor=1.0)  # Never decodes.
  fn = sampler.for_config(config, model, ddpm_train.build_schedule(config), stage1, None,
                          decode=False)
  ids = jnp.full((batch, config.conditioning.max_length), 3, jnp.int32)
  noise = jax.random.normal(jax.random.PRNGKey(1), (batch, LATENT, LATENT, CHANNELS))
  calls = layer_calls(fn, params, None, jax.random.PRNGKey(2), ids, noise, 4.0)
  return lambda: fn(params, None, jax.random.PRNGKey(2), ids, noise, 4.0).block_until_ready(), calls


def bench_ours_sampling(config, model, params, batch, repeats):
  return timed(ours_sampling_fn(config, model, params, batch)[0], repeats)


def torch_sampling_fn(config, modules, batch, device='cpu', dtype='float32'):
  autocast, sync = torch_on(device, dtype)
  unet, text_encoder = (m.eval() for m in modules)
  sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule='scaled_linear', clip_sample=False)
  ids = torch.full((batch, config.conditioning.max_length), 3, device=device)

  @torch.no_grad()
  def theirs():
    with autocast():
      context = torch.cat([encode_text(text_encoder, ids), torch.zeros(
          batch, ids.shape[1], config.conditioning.width, device=device)])
      sched.set_timesteps(50)
      z = torch.randn(batch, CHANNELS, LATENT, LATENT, device=device)
      for t in sched.timesteps:
        out = unet(torch.cat([z, z]), t, encoder_hidden_states=context).sample.float()
        cond, uncond = out.chunk(2)
        z = sched.step(uncond + 4.0 * (cond - uncond), t, z).prev_sample
    sync()

  return theirs


def bench_torch_sampling(config, modules, batch, repeats, device='cpu', dtype='float32'):
  return timed(torch_sampling_fn(config, modules, batch, device, dtype), repeats)


def vae_fns(batch, device='cpu', dtype='float32'):
  """(our encode + decode, diffusers', parameter count, FLOPs fn, `layer_calls`)."""
  autocast, sync = torch_on(device, dtype)
  config = vae_anime.get_config()
  config.vae.dtype = dtype
  model = vae_state.build_model(config)
  size = config.data.image_size
  params = autoencoder.init_params(model, jax.random.PRNGKey(0), size)
  x = jax.random.uniform(jax.random.PRNGKey(1), (batch, size, size, 3), minval=-1, maxval=1)
  fn = jax.jit(lambda p, x: model.apply({'params': p}, x)[0])
  calls = layer_calls(fn, params, x)
  ours = lambda: fn(params, x).block_until_ready()
  vae = AutoencoderKL(**autoencoder.diffusers_config(model)).eval().to(device)
  xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).to(device)

  @torch.no_grad()
  def theirs():
    with autocast():
      vae.decode(vae.encode(xt).latent_dist.mode()).sample
    sync()

  n_params = sum(v.size for v in jax.tree.leaves(params))
  return ours, theirs, n_params, lambda: xla_flops(fn, params, x), calls


def bench_vae(batch, repeats, device='cpu', dtype='float32', with_flops=False):
  ours, theirs, n_params, flops, _ = vae_fns(batch, device, dtype)
  if with_flops:
    return timed(ours, repeats), timed(theirs, repeats), n_params, flops()
  return timed(ours, repeats), timed(theirs, repeats), n_params


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=5, help='Rounds for (a) and (c); (b), '
                      'about a minute per call, gets a third of them (at least 2).')
  parser.add_argument('--rows', default='abc', help='Which rows to measure (--write: all).')
  parser.add_argument('--write', action='store_true')
  args = parser.parse_args()
  if args.write and sorted(args.rows) != list('abc'):
    parser.error('--write replaces the whole section: measure every row (--rows abc).')
  torch.manual_seed(0)
  b, r = args.batch, args.repeats

  measure = lambda ours, theirs, repeats, calls, backward=False: with_kernel(
      {'ours': ours, 'theirs': theirs}, repeats, calls, backward)

  ours_train, box, config, model, _, calls = ours_train_fn(b)
  theirs_train, modules = torch_train_fn(config, model, b)
  n_params = sum(x.size for x in jax.tree.leaves(box[0].params))
  rows = {}
  if 'a' in args.rows:
    rows['a'] = (f'ldm_anime_text train step, batch {b} ({n_params / 1e6:.1f}M parameters: text '
                 'encoder + U-Net on 16x16x4)', '.3f',
                 measure(ours_train, theirs_train, r, calls, backward=True))
  if 'b' in args.rows:  # With the train step's initial parameters.
    ours_sample, calls = ours_sampling_fn(config, model, box[0].params, b)
    rows['b'] = (f'guided DDIM-50, batch {b} (cond + uncond in one pass)', '.2f',
                 measure(ours_sample, torch_sampling_fn(config, modules, b), max(2, r // 3), calls))
  if 'c' in args.rows:
    ours_vae, theirs_vae, vae_params, _, calls = vae_fns(b)
    rows['c'] = (f'vae_anime encode + decode, batch {b} at 64x64 ({vae_params / 1e6:.1f}M)', '.3f',
                 measure(ours_vae, theirs_vae, r, calls))
  device = jax.devices()[0]
  cell = lambda t, fmt: (f'{t["ours"]:{fmt}} s | {t["theirs"]:{fmt}} s | '
                         f'{t["theirs"] / t["ours"]:.2f}x | {t["kernel"]:.2f}x '
                         f'({t["gflops"][0]:.0f} / {t["gflops"][1]:.0f}) |')
  lines = [
      '## latent',
      '',
      f'Machine: {platform.machine()}, {len(jax.devices())} JAX device(s) {device.platform}:'
      f'{device.device_kind}, torch {torch.__version__} ({torch.get_num_threads()} threads), '
      f'jax {jax.__version__}. Command: `python benchmarks/bench_latent.py --batch {b} '
      f'--repeats {r} --write`. Ratio = diffusers time / our time (> 1: ours is faster), '
      'medians of rounds that call ours, diffusers and the kernel in turn, 2 s apart. "Kernel" '
      "is the ratio of the model's own conv and dense layers alone (every call one step or one "
      'network call makes, at its shape, without bias; for (a) each output and both gradients) '
      'in the same rounds (XLA / PyTorch GFLOP/s): below it, time goes outside the kernels.',
      '',
      '| what | ours | diffusers | ratio | kernel |',
      '|---|---|---|---|---|',
      *(f'| ({key}) {what} | {cell(t, fmt)}' for key, (what, fmt, t) in sorted(rows.items())),
      '',
  ]
  report = '\n'.join(lines)
  print(report)
  if args.write:
    write_section(Path(__file__).with_name('RESULTS.md'), 'latent', report)


if __name__ == '__main__':
  main()
