"""The one guided sampler of latent diffusion: text/class LDMs, fine-tuned runs and Stable
Diffusion pipelines all sample through `make_sample_fn`.

A denoiser here is a Flax module with `encode(ids) -> (context, mask)`,
`null(batch) -> (context, mask)` and `__call__(z, t, context, mask, control=...,
control_scale=..., guess_mode=...)`: `latent.ldm.unet.LatentDenoiser` (its learned null
context) or `latent.sd.denoiser.PipelineDenoiser` (SD's U-Net and CLIP; the unconditional
context is a prompt's encoding, the negative prompt's). Every weight is an argument of
the compiled function, never a constant folded into it: the same program serves other
weights (adapters, EMA, a ControlNet) and keeps the placement (FSDP, bfloat16) the loader
gave them.

Text-to-image, image-to-image (SDEdit at `strength`), inpainting (diffusers' rule: the
kept latents re-imposed after every step, noised with the initial noise; or an
inpainting U-Net's extra input channels) and ControlNet (guess mode included) are the
same loop, as diffusers' Stable Diffusion pipelines run them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from common import errors, lora
from ddpm import samplers
from latent.controlnet import model as controlnet_lib
from latent.finetune import hypernetwork
from latent.ldm import guidance


def denoise(model, params, z, t, context, mask, **kwargs):
  """The denoiser's output; a hypernetwork in `params` acts on the cross-attention context."""
  with hypernetwork.applied(params):
    return model.apply({'params': params}, z, t, context, mask, **kwargs)


def condition(model, params, ids, negative_ids=None):
  """(context, mask) of condition ids and the unconditional (context, mask) of the same batch:
  the encoding of `negative_ids` where given, else the model's null context."""
  context, mask = model.apply({'params': params}, ids, method='encode')
  if negative_ids is None:
    null, null_mask = model.apply({'params': params}, ids.shape[0], method='null')
  else:
    null, null_mask = model.apply({'params': params}, negative_ids, method='encode')
  return context, mask, null, null_mask


def mask_channels(model, latent_channels: int) -> int:
  """0 for a U-Net on latents alone; 1 + latent_channels for an inpainting U-Net (SD
  inpainting: [x_t, mask, latents of the masked picture])."""
  extra = model.unet.in_channels - latent_channels
  if extra not in (0, 1 + latent_channels):
    raise errors.ConfigError(f'unet in_channels={model.unet.in_channels}: expected '
                             f'{latent_channels} or {2 * latent_channels + 1} (an inpainting '
                             'U-Net).')
  return extra


def make_sample_fn(model, schedule, codec, options: dict, *, strength: float = 1.0,
                   inpaint: bool = False, decode: bool = True, guess_mode: bool = False):
  """jit(fn(params, vae_params, rng, ids, noise, guidance_scale, init_z0=None, keep=None,
  control=None, control_scale=1.0, negative_ids=None, masked_z0=None) -> images in [-1, 1]).

  `options` are `ddpm.samplers.sample`'s keywords (sampler, num_steps, prediction, spacing,
  steps_offset, ...). `codec` is the VAE (`latent.vae.codec.Codec`: latent channels, decode).
  `init_z0` (scaled latents of a picture) starts the last int(strength * steps) steps from
  the picture noised with `noise` (image-to-image); with `inpaint`, latents where `keep`
  [B, h, w, 1] is 1 are re-imposed from init_z0, noised with that same noise, after every
  step, as diffusers' inpainting pipeline does. An inpainting U-Net instead sees
  [1 - keep, masked_z0] beside x_t (`masked_z0`: the picture's latents with the repainted
  region grey, `Codec.encode(..., keep)`). `control` [B, H, W, C] in [0, 1] steers a model
  with a ControlNet at `control_scale`; in `guess_mode` its residuals reach the conditional
  half of guidance's batch only, scaled as diffusers' guess mode. `negative_ids` (a
  negative prompt) replace the model's null context as guidance's unconditional input.
  decode=False returns the scaled latents instead of images.
  """
  extra_channels = mask_channels(model, codec.latent_channels)
  if extra_channels and not inpaint:
    raise errors.ConfigError('This U-Net is an inpainting model (9 input channels): give '
                             'sample.init_image and sample.mask.')
  if extra_channels and getattr(model, 'controlnet', None) is not None:
    raise errors.ConfigError('A ControlNet steers a U-Net on latents alone; this one is an '
                             'inpainting U-Net.')

  def sample_fn(params, vae_params, rng, ids, noise, guidance_scale, init_z0=None, keep=None,
                control=None, control_scale=1.0, negative_ids=None, masked_z0=None):
    params = lora.merged(params)  # W + scale A B where adapters are (common.lora).
    context, mask, null, null_mask = condition(model, params, ids, negative_ids)
    extra = {}
    if control is not None:  # Guidance's batch is [conditional; unconditional].
      both, scale = controlnet_lib.for_guidance(control, control_scale, guess_mode)
      extra = dict(control=both, control_scale=scale, guess_mode=guess_mode)
    apply = lambda x, t, c, m: denoise(model, params, x, t, c, m, **extra)
    model_fn = guidance.guided_model_fn(apply, context, mask, null, null_mask, guidance_scale)
    inject = None
    if extra_channels:  # diffusers: [x_t, mask (1 = repaint), latents of the masked picture].
      beside = jnp.concatenate([1.0 - keep, masked_z0], axis=-1)
      unet_fn = model_fn
      model_fn = lambda x, t: unet_fn(jnp.concatenate([x, beside.astype(x.dtype)], -1), t)
    elif inpaint:
      inject = samplers.reimposing(init_z0, keep, noise)
    z0 = samplers.sample(schedule, model_fn, noise, rng, **options, inject=inject,
                         init_x0=init_z0 if strength < 1.0 else None, strength=strength)
    return codec.decode(vae_params, z0) if decode else z0

  return jax.jit(sample_fn)


def for_config(config, model, schedule, codec, overrides: dict | None = None, **kwargs):
  """`make_sample_fn` with the sampler settings of an experiment config (`sample`,
  `diffusion`; `overrides`: a pipeline's steps_offset, say); kwargs as make_sample_fn's."""
  return make_sample_fn(model, schedule, codec,
                        samplers.options_from_config(config, **(overrides or {})), **kwargs)
