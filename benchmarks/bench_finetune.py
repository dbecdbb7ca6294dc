"""Fine-tuning steps against diffusers' training recipes (PyTorch), side by side in one run.

  python benchmarks/bench_finetune.py [--batch 8] [--repeats 3] [--write]

The model is bench_latent's: `ldm_anime_text` (text encoder + conditional U-Net on
16x16x4 latents), ours in JAX and the same architecture as diffusers'
UNet2DConditionModel plus a torch Transformer text encoder. One optimiser step of:

  dreambooth         the U-Net trains, the text encoder is frozen (train_dreambooth.py)
  lora               rank-4 adapters on to_q/to_k/to_v/to_out of the U-Net, the rest frozen
                     (train_dreambooth_lora.py: PEFT's LoraConfig through unet.add_adapter)
  textual_inversion  one new token row trains; gradients flow through the frozen U-Net and
                     text encoder (train_textual_inversion.py: the whole embedding table
                     takes gradients, the other rows are restored after each step)
  hypernetwork       ours only: diffusers has no hypernetwork recipe (the SD web UI's is
                     not a library)

Both sides: AdamW/Adam, gradient clipping at 1, float32, the same batch. Ours also
keeps the EMA of the trainable weights (off in the fine-tuning configs' sampling, on
in the step). Prints ratios (> 1: we are faster); --write replaces the
`## fine-tuning steps` section of benchmarks/RESULTS.md.
"""

import argparse
import functools
import platform
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# bench_latent patches torchvision (diffusers on CPU torch) before torch is imported.
from bench_latent import (CHANNELS, LATENT, encode_text, latent_batch, ldm_setup, stepper,
                          torch_modules)  # pylint: disable=wrong-import-position
from bench_ddpm import timed, write_section  # pylint: disable=wrong-import-position

import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffusers import DDIMScheduler  # pylint: disable=wrong-import-position
from peft import LoraConfig  # pylint: disable=wrong-import-position

from common import lora, loop, mesh as mesh_lib  # pylint: disable=wrong-import-position
from common import params as params_lib  # pylint: disable=wrong-import-position
from ddpm import train as ddpm_train  # pylint: disable=wrong-import-position
from latent.finetune import experiment as finetune, hypernetwork  # pylint: disable=wrong-import-position
from latent.ldm import conditions, train  # pylint: disable=wrong-import-position

METHODS = ('dreambooth', 'lora', 'textual_inversion', 'hypernetwork')


def bench_ours(method, batch, repeats):
  config, model, stage1, tokenizer = ldm_setup(batch)
  config.train.ema_decay = 0.0
  if method == 'textual_inversion':
    conds = conditions.Conditions('text', tokenizer).with_tokens(['sks'])
    model = train.build_model(config, conds, stage1)
    tokenizer = conds.tokenizer
  rules = params_lib.Rules(ml_params(finetune.TRAINABLE[method]))
  mesh = mesh_lib.make_mesh()
  tx = ddpm_train.make_optimizer(config, rules)
  params = train.init_state(config, model, ddpm_train.optax.identity()).params
  if method == 'lora':
    params = lora.add(params, jax.random.PRNGKey(1), 4, None, r'unet/.*/(to_q|to_k|to_v|to_out_0)')
  elif method == 'hypernetwork':
    params = {**params, hypernetwork.KEY: hypernetwork.init(jax.random.PRNGKey(1),
                                                            config.conditioning.width)}
  state = ddpm_train.new_state(params, tx, rules, jax.random.PRNGKey(2))
  state = jax.device_put(jax.tree.map(lambda x: x.copy(), state), mesh_lib.replicated(mesh))
  step = loop.jit_step(functools.partial(
      train.train_step, vae_params=None, config=config, model=model,
      schedule=ddpm_train.build_schedule(config), tx=tx, stage1=stage1, rules=rules), mesh)
  ours, _ = stepper(step, state, latent_batch(tokenizer, batch, 'sks long hair and blue eyes'),
                    mesh)
  trainable = sum(x.size for x in jax.tree.leaves(rules.split(state.params)[0]))
  return timed(ours, repeats), trainable, config, model


def ml_params(trainable):
  c = params_lib.get_config()
  c.trainable = trainable
  return c


def bench_theirs(method, config, model, batch, repeats):
  unet, text_encoder = torch_modules(config, model)
  unet.requires_grad_(False)
  text_encoder.requires_grad_(False)
  if method == 'dreambooth':
    unet.requires_grad_(True)
    trained = list(unet.parameters())
  elif method == 'lora':
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights='gaussian',
                                target_modules=['to_k', 'to_q', 'to_v', 'to_out.0']))
    trained = [p for p in unet.parameters() if p.requires_grad]
  else:
    text_encoder.embed.weight.requires_grad_(True)
    trained = [text_encoder.embed.weight]
  opt = torch.optim.AdamW(trained, lr=1e-4)
  sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule='scaled_linear')
  z0 = torch.randn(batch, CHANNELS, LATENT, LATENT)
  ids = torch.randint(2, 40, (batch, config.conditioning.max_length))
  keep = text_encoder.embed.weight.detach().clone()
  new_row = torch.zeros(keep.shape[0], dtype=torch.bool)
  new_row[-1] = True

  def theirs():
    t = torch.randint(0, 1000, (batch,))
    noise = torch.randn_like(z0)
    if method == 'textual_inversion':
      context = encode_text(text_encoder, ids)
    else:
      with torch.no_grad():
        context = encode_text(text_encoder, ids)
    loss = torch.nn.functional.mse_loss(
        unet(sched.add_noise(z0, noise, t), t, encoder_hidden_states=context).sample, noise)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    opt.step()
    if method == 'textual_inversion':  # The recipe restores every row but the new token's.
      with torch.no_grad():
        text_encoder.embed.weight[~new_row] = keep[~new_row]

  return timed(theirs, repeats), sum(p.numel() for p in trained)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--write', action='store_true')
  args = parser.parse_args()
  torch.manual_seed(0)
  b, r = args.batch, args.repeats
  rows = []
  for method in METHODS:
    ours, trainable, config, model = bench_ours(method, b, r)
    if method == 'hypernetwork':
      rows.append(f'| {method} | {trainable:,} | {ours:.3f} s | (no diffusers recipe) | - |')
      continue
    theirs, their_trainable = bench_theirs(method, config, model, b, r)
    rows.append(f'| {method} | {trainable:,} (diffusers {their_trainable:,}) | {ours:.3f} s | '
                f'{theirs:.3f} s | {theirs / ours:.2f}x |')
    print(rows[-1], flush=True)
  device = jax.devices()[0]
  lines = [
      '## fine-tuning steps',
      '',
      f'Machine: {platform.machine()}, {len(jax.devices())} JAX device(s) {device.platform}:'
      f'{device.device_kind}, torch {torch.__version__} ({torch.get_num_threads()} threads), '
      f'jax {jax.__version__}. Command: `python benchmarks/bench_finetune.py --batch {b} '
      f'--repeats {r} --write`. One optimiser step of each method on `ldm_anime_text` '
      '(batch of 16x16x4 latents and captions) against the step of diffusers\' training '
      'script for it, float32. Ratio = diffusers time / our time (> 1: ours is faster).',
      '',
      '| method | trainable parameters | ours | diffusers | ratio |',
      '|---|---|---|---|---|',
      *rows,
      '',
  ]
  report = '\n'.join(lines)
  print(report)
  if args.write:
    write_section(Path(__file__).with_name('RESULTS.md'), 'fine-tuning steps', report)


if __name__ == '__main__':
  main()
