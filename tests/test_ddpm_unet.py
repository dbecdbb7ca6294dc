"""The U-Net against diffusers' UNet2DModel, weight for weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from ddpm import convert, models

TINY = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
            attention_resolutions=(8,), head_dim=16, norm_groups=8)


def random_pair():
  """A random diffusers UNet2DModel and our U-Net (TINY) holding the same weights."""
  unet = models.UNet(**TINY)
  torch.manual_seed(0)
  reference = UNet2DModel(**convert.diffusers_config(unet)).eval()
  # Random (not zero-initialised) weights everywhere, so every block matters.
  with torch.no_grad():
    for p in reference.parameters():
      p.normal_(0, 0.05)
  init = unet.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)))['params']
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  return unet, reference, convert.params_from_torch_state_dict(state, init)


@pytest.fixture(scope='module')
def pair():
  unet, reference, params = random_pair()
  apply = jax.jit(lambda p, x, t: unet.apply({'params': p}, x, t))
  return unet, reference, params, apply


def test_same_parameter_count_as_diffusers(pair):
  _, reference, params, _ = pair
  assert sum(x.size for x in jax.tree.leaves(params)) == sum(
      p.numel() for p in reference.parameters())


def test_output_matches_diffusers(pair):
  _, reference, params, apply = pair
  x = np.random.RandomState(0).randn(3, 16, 16, 3).astype(np.float32)
  t = np.array([0, 421, 999])
  ours = np.asarray(apply(params, x, t))
  with torch.no_grad():
    theirs = reference(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t)).sample
  theirs = theirs.permute(0, 2, 3, 1).numpy()
  assert ours.shape == x.shape
  np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())


def test_timestep_changes_output(pair):
  _, _, params, apply = pair
  x = np.random.RandomState(1).randn(1, 16, 16, 3).astype(np.float32)
  a, b = apply(params, x, np.array([10])), apply(params, x, np.array([900]))
  # Far above float32 noise (the diffusers match above is 1e-4 of the scale).
  assert float(jnp.abs(a - b).max()) > 1e-2 * float(jnp.abs(a).max())


def test_bfloat16_compute_is_close_to_float32(pair):
  unet, _, params, apply = pair
  bf16 = models.UNet(**TINY, dtype=jnp.bfloat16)
  x = np.random.RandomState(2).randn(2, 16, 16, 3).astype(np.float32)
  t = np.array([5, 500])
  ref = np.asarray(apply(params, x, t))
  out = np.asarray(bf16.apply({'params': params}, x, t))
  assert out.dtype == np.float32
  assert np.abs(out - ref).mean() < 0.05 * np.abs(ref).mean()


def test_load_diffusers_folder(pair, tmp_path):
  unet, reference, params, _ = pair
  reference.save_pretrained(tmp_path)
  built = convert.unet_from_diffusers_config(tmp_path)
  assert built == unet
  loaded = convert.load_diffusers_unet(tmp_path, params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_missing_diffusers_weights_name_the_file(pair, tmp_path):
  _, _, params, _ = pair
  with pytest.raises(FileNotFoundError, match='diffusion_pytorch_model.safetensors not found'):
    convert.load_diffusers_unet(tmp_path, params)


def test_wrong_input_shape(pair):
  unet, _, params, _ = pair
  with pytest.raises(ValueError, match=r'expects \[B, 16, 16, 3\] inputs, got \(1, 32, 32, 3\)'):
    unet.apply({'params': params}, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))
