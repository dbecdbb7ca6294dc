"""latent/ stage 2 building blocks: attention, the conditional U-Net, text, classes, guidance."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm import convert
from latent.ldm import attention, conditions, guidance, text, unet


def test_cross_attention_matches_float64_softmax_formula():
  rng = np.random.default_rng(0)
  heads, head_dim = 2, 4
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  context = rng.normal(size=(2, 3, 6)).astype(np.float32)
  mask = np.array([[True, True, False], [True, False, False]])
  module = attention.Attention(heads, head_dim)
  params = module.init(jax.random.PRNGKey(0), x, context, mask)['params']
  out = np.asarray(module.apply({'params': params}, x, context, mask))

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  split = lambda a: a.reshape(*a.shape[:2], heads, head_dim)
  q = split(x @ p['to_q']['kernel'])
  k, v = split(context @ p['to_k']['kernel']), split(context @ p['to_v']['kernel'])
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(head_dim)
  logits = np.where(mask[:, None, None, :], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  ref = np.einsum('bhqk,bkhd->bqhd', weights, v).reshape(2, 5, heads * head_dim)
  ref = ref @ p['to_out_0']['kernel'] + p['to_out_0']['bias']
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  # Masked keys have no influence at all.
  changed = context.copy()
  changed[0, 2] += 100.0
  changed[1, 1:] -= 50.0
  np.testing.assert_array_equal(module.apply({'params': params}, x, changed, mask), out)


def _diffusers_pair(cross_dim=12):
  """A tiny diffusers UNet2DConditionModel and our ConditionalUNet of the same shape."""
  import diffusers  # pylint: disable=g-import-not-at-top
  ours = unet.ConditionalUNet(sample_size=8, in_channels=4, out_channels=4,
                              block_out_channels=(16, 32), layers_per_block=1,
                              attention_resolutions=(8,), head_dim=8, norm_groups=8)
  theirs = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
      layers_per_block=1, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), norm_num_groups=8,
      cross_attention_dim=cross_dim, attention_head_dim=(2, 4), use_linear_projection=True)
  return ours, theirs.eval()


def _sd1_pair():
  """SD 1.x's layout: 1x1-conv projections and the same number of heads at every level."""
  import diffusers  # pylint: disable=g-import-not-at-top
  ours = unet.ConditionalUNet(sample_size=8, in_channels=4, out_channels=4,
                              block_out_channels=(16, 32), layers_per_block=1,
                              attention_resolutions=(8,), num_heads=2, norm_groups=8,
                              linear_projection=False)
  theirs = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
      layers_per_block=1, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), norm_num_groups=8,
      cross_attention_dim=12, attention_head_dim=2, use_linear_projection=False,
      upcast_attention=True)
  return ours, theirs.eval()


@pytest.mark.parametrize('pair', [_diffusers_pair, _sd1_pair], ids=['linear_proj', 'sd1_conv_proj'])
def test_conditional_unet_matches_diffusers_unet2dcondition(pair):
  import torch  # pylint: disable=g-import-not-at-top
  ours, theirs = pair()
  with torch.no_grad():  # Random everything (proj_out is zero-initialised in diffusers).
    for p in theirs.parameters():
      p.add_(0.05 * torch.randn_like(p))
  rng = np.random.default_rng(1)
  z = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  t = np.array([3, 777])
  context = rng.normal(size=(2, 5, 12)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  reference = ours.init(jax.random.PRNGKey(0), z, t, context=context, context_mask=mask)['params']
  state = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
  params = convert.params_from_torch_state_dict(state, reference)
  with torch.no_grad():
    want = theirs(torch.from_numpy(z.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                  encoder_hidden_states=torch.from_numpy(context),
                  encoder_attention_mask=torch.from_numpy(mask.astype(np.float32))).sample
  got = ours.apply({'params': params}, z, t, context=context, context_mask=mask)
  want = want.numpy().transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(got) - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_tokenizer_round_trip_unknown_words_truncation_and_padding(caplog):
  captions = ['blonde long hair and blue eyes', 'red hair and green eyes', 'red short hair']
  tok = text.Tokenizer.from_captions(captions, max_length=6)
  assert tok.vocab[:2] == [text.PAD, text.UNK]
  assert tok.vocab[2:5] == ['hair', 'and', 'eyes']  # Most frequent first.
  ids, mask = tok.encode(captions)
  assert ids.shape == (3, 6) and ids.dtype == np.int32
  assert [tok.decode(i) for i in ids] == captions
  np.testing.assert_array_equal(mask, ids != 0)
  assert mask.sum(1).tolist() == [6, 5, 3]
  ids, _ = tok.encode(['Silver hair, and BLUE eyes!'])
  assert tok.decode(ids[0]) == '<unk> hair and blue eyes'
  assert tok.unknown_words('silver hair') == ['silver']
  with caplog.at_level(logging.WARNING):
    ids, mask = tok.encode(['blonde long hair and blue eyes and red'])
  assert 'truncated to the maximum length 6' in caplog.text
  assert tok.decode(ids[0]) == 'blonde long hair and blue eyes' and mask.all()


def test_tokenizer_save_load(tmp_path):
  tok = text.Tokenizer.from_captions(['a b c', 'b c'], max_length=3)
  tok.save(tmp_path / 't.json')
  again = text.Tokenizer.load(tmp_path / 't.json')
  assert again.vocab == tok.vocab and again.max_length == 3


def test_text_encoder_ignores_padding():
  encoder = text.TextEncoder(vocab_size=10, max_length=6, width=16, layers=2, heads=2)
  ids = np.array([[3, 4, 5, 0, 0, 0]], np.int32)
  params = encoder.init(jax.random.PRNGKey(0), ids)['params']
  context, mask = encoder.apply({'params': params}, ids)
  assert context.shape == (1, 6, 16) and mask.tolist() == [[True] * 3 + [False] * 3]
  # Whatever sits in the padded positions, the real tokens encode the same.
  junk = np.array([[3, 4, 5, 9, 8, 7]], np.int32)
  context2, _ = encoder.apply({'params': params}, junk, mask)
  np.testing.assert_allclose(context2[:, :3], context[:, :3], rtol=1e-6, atol=1e-6)


def test_class_of_caption_and_unknown_class():
  names = ('blonde', 'red', 'blue', 'green')
  assert conditions.class_of('red short hair and blue eyes', names, 'hair') == 'red'
  assert conditions.class_of('long hair and blue eyes', names, 'hair') is None
  assert conditions.class_of('red blue hair', names, 'hair') is None  # Two hair colours.
  assert conditions.class_of('blue eyes', names, 'hair') is None
  conds = conditions.Conditions('class', class_names=names, scope_word='hair')
  ids, keep = conds.training_ids(['red hair', 'blue eyes', 'green long hair and red eyes'])
  assert keep.tolist() == [True, False, True] and ids[keep, 0].tolist() == [1, 3]
  assert conds.prompt_ids(['blonde', 'green hair and red eyes']).tolist() == [[0], [3]]
  with pytest.raises(ValueError, match="Unknown class in prompt 'silver'.*blonde, red"):
    conds.prompt_ids(['silver'])


def test_condition_dropout_rate_and_null_context():
  b, length, width, prob = 20_000, 3, 4, 0.15
  context = jnp.ones((b, length, width))
  mask = jnp.ones((b, length), bool).at[:, -1].set(False)
  null = jnp.full((length, width), -2.0)
  out, out_mask, dropped = guidance.drop_condition(jax.random.PRNGKey(0), context, mask, null,
                                                   jnp.ones((length,), bool), prob)
  rate = float(dropped.mean())
  assert abs(rate - prob) < 4 * np.sqrt(prob * (1 - prob) / b)
  np.testing.assert_array_equal(out[dropped], np.broadcast_to(null, (int(dropped.sum()), length, width)))
  np.testing.assert_array_equal(out[~dropped], 1.0)
  assert bool(out_mask[dropped].all()) and not bool(out_mask[~dropped][:, -1].any())


def test_guidance_scale_one_is_conditional_and_zero_unconditional():
  model = unet.ConditionalUNet(sample_size=8, in_channels=4, out_channels=4,
                               block_out_channels=(16,), layers_per_block=1,
                               attention_resolutions=(8,), head_dim=8, norm_groups=8)
  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  t = jnp.array([10, 500])
  context = jnp.asarray(rng.normal(size=(2, 3, 12)), jnp.float32)
  null = jnp.asarray(rng.normal(size=(2, 3, 12)), jnp.float32)
  mask = jnp.ones((2, 3), bool)
  params = model.init(jax.random.PRNGKey(0), z, t, context=context, context_mask=mask)['params']
  apply = lambda x, tt, c, m: model.apply({'params': params}, x, tt, context=c, context_mask=m)
  cond, uncond = apply(z, t, context, mask), apply(z, t, null, mask)
  for scale, want in ((1.0, cond), (0.0, uncond), (3.0, uncond + 3.0 * (cond - uncond))):
    got = guidance.guided_model_fn(apply, context, mask, null, mask, scale)(z, t)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_class_names_are_checked_for_class_models_only():
  """A text LDM needs no class names; a class LDM needs distinct, non-empty ones."""
  from latent.configs import ldm_base  # pylint: disable=g-import-not-at-top
  config = ldm_base.get_config()
  config.vae_workdir = '/some/vae'
  config.conditioning.kind = 'text'
  config.conditioning.class_names = ()
  ldm_base.validate(config)
  config.conditioning.kind = 'class'
  with pytest.raises(ValueError, match='conditioning.class_names must be distinct and non-empty'):
    ldm_base.validate(config)
  config.conditioning.class_names = ('red', 'red')
  with pytest.raises(ValueError, match='conditioning.class_names must be distinct'):
    ldm_base.validate(config)
  config.conditioning.class_names = ('red', 'blue')
  ldm_base.validate(config)
