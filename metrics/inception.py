"""The FID Inception-v3 (TF 2015-12-05 graph, as ported by pytorch-fid) in Flax.

Every published FID uses this exact network: Inception-v3 with 1008 classes
and three deviations from torchvision's Inception that mimic the TF graph:
the pooling branches of the A, C and first E blocks average without counting
the zero padding (TF's `avg_pool` semantics), and the last E block max-pools.
Features are the global average of a block's output: 64 (first max pool),
192 (second max pool), 768 (input of the aux classifier) or 2048 (pool3).

The network works in NHWC. Batch norm is folded into the convolutions when
the torch state dict is converted (`params_from_state_dict`): the network is
only ever used for inference, and one conv + bias is faster than conv + BN.
Parameter names follow torchvision's (`Mixed_5b/branch1x1/conv/kernel`). For
speed on CPU, the 1x1 convolutions that open each block run as one matmul,
and the average-pool branches convolve before pooling (exact: see
`_avg_pool_3x3`); the outputs match pytorch-fid to float32 rounding.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Feature width -> index of the block whose (spatially averaged) output it is.
BLOCK_INDEX_BY_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}
# torch's BasicConv2d uses BatchNorm2d(eps=0.001), like the TF graph.
BN_EPS = 1e-3


def _pad(padding) -> tuple[tuple[int, int], tuple[int, int]]:
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return ((ph, ph), (pw, pw))


class Conv(nn.Module):
  """nn.Conv's parameters (kernel HWIO, bias), computed the fast way on CPU.

  XLA:CPU runs 1x1 convolutions 2-4x faster as a plain matmul than through
  its convolution kernel; larger kernels stay convolutions.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))

  @nn.compact
  def kernel_bias(self, in_features: int):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        self.kernel_size + (in_features, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    return kernel, bias

  def __call__(self, x):
    kernel, bias = self.kernel_bias(x.shape[-1])
    if self.kernel_size == (1, 1) and self.strides == 1:
      y = jnp.einsum('bhwi,io->bhwo', x, kernel[0, 0])
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, (self.strides, self.strides), self.padding,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias


class BasicConv2d(nn.Module):
  """Conv (+ folded batch norm) + ReLU, torch's `BasicConv2d`."""
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: int | tuple[int, int] = 0

  def setup(self):
    self.conv = Conv(self.features, self.kernel_size, self.strides, _pad(self.padding))

  def __call__(self, x):
    return nn.relu(self.conv(x))


def fused_1x1(x, convs: Sequence[BasicConv2d]) -> list:
  """Several 1x1 BasicConv2d of the same input as one matmul, before ReLU.

  Inception blocks open with up to four 1x1 convolutions of their input; one
  wide matmul instead of four narrow ones is markedly faster on CPU.
  Returns each conv's pre-activation output (conv + bias, no ReLU).
  """
  kernels, biases = zip(*(c.conv.kernel_bias(x.shape[-1]) for c in convs))
  y = jnp.einsum('bhwi,io->bhwo', x, jnp.concatenate([k[0, 0] for k in kernels], axis=-1))
  y = y + jnp.concatenate(biases)
  splits = np.cumsum([k.shape[-1] for k in kernels])[:-1]
  return jnp.split(y, splits, axis=-1)


def _avg_pool_3x3(x):
  # TF's average pool ignores the zero padding: count_include_pad=False.
  # Its weights then sum to 1 at every pixel, so it commutes with a 1x1 conv
  # plus bias: the pool branches convolve first (fewer channels to pool).
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), 'VALID')


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d (pytorch-fid's FIDInceptionA)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1, b5, b3, bp = fused_1x1(x, [
        BasicConv2d(64, name='branch1x1'), BasicConv2d(48, name='branch5x5_1'),
        BasicConv2d(64, name='branch3x3dbl_1'),
        BasicConv2d(self.pool_features, name='branch_pool')])
    b1, b5, b3 = nn.relu(b1), nn.relu(b5), nn.relu(b3)
    b5 = BasicConv2d(64, (5, 5), padding=2, name='branch5x5_2')(b5)
    b3 = BasicConv2d(96, (3, 3), padding=1, name='branch3x3dbl_2')(b3)
    b3 = BasicConv2d(96, (3, 3), padding=1, name='branch3x3dbl_3')(b3)
    bp = nn.relu(_avg_pool_3x3(bp))  # = conv(avg_pool(x)): see _avg_pool_3x3.
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = BasicConv2d(64, name='branch3x3dbl_1')(x)
    bd = BasicConv2d(96, (3, 3), padding=1, name='branch3x3dbl_2')(bd)
    bd = BasicConv2d(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (FIDInceptionC): factorised 7x7 convolutions."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1, b7, bd, bp = fused_1x1(x, [
        BasicConv2d(192, name='branch1x1'), BasicConv2d(c7, name='branch7x7_1'),
        BasicConv2d(c7, name='branch7x7dbl_1'), BasicConv2d(192, name='branch_pool')])
    b1, b7, bd = nn.relu(b1), nn.relu(b7), nn.relu(bd)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = nn.relu(_avg_pool_3x3(bp))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    b3, b7 = map(nn.relu, fused_1x1(x, [BasicConv2d(192, name='branch3x3_1'),
                                        BasicConv2d(192, name='branch7x7x3_1')]))
    b3 = BasicConv2d(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv2d(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (E_2, max pool)."""
  pool: str  # 'avg' or 'max'

  @nn.compact
  def __call__(self, x):
    branches = [BasicConv2d(320, name='branch1x1'), BasicConv2d(384, name='branch3x3_1'),
                BasicConv2d(448, name='branch3x3dbl_1')]
    pool_conv = BasicConv2d(192, name='branch_pool')
    if self.pool == 'avg':  # The pool branch's 1x1 joins the fused matmul.
      b1, b3, bd, bp = fused_1x1(x, branches + [pool_conv])
      bp = nn.relu(_avg_pool_3x3(bp))
    else:
      # The TF graph's last block max-pools (a quirk every FID inherits);
      # max does not commute with the conv, so it pools the input first.
      b1, b3, bd = fused_1x1(x, branches)
      bp = pool_conv(nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))))
    b1, b3, bd = nn.relu(b1), nn.relu(b3), nn.relu(bd)
    b3 = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
    ], axis=-1)
    bd = BasicConv2d(384, (3, 3), padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
    ], axis=-1)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Inception-v3 up to pool3, returning the requested block features.

  Input: NHWC floats in [-1, 1], normally 299x299 (`features.FeatureExtractor` resizes).
  Output: a list, one [N, C] array per entry of `output_blocks` (sorted),
  each the spatial mean of that block's output (pytorch-fid applies
  adaptive_avg_pool2d to the 64/192/768-d blocks, and block 3 ends with it).
  """
  output_blocks: Sequence[int] = (3,)

  @nn.compact
  def __call__(self, x):
    blocks = sorted(self.output_blocks)
    last = max(blocks)
    outputs = []

    def emit(idx, h):
      if idx in blocks:
        outputs.append(jnp.mean(h, axis=(1, 2)))
      return idx == last

    # Block 0: stem up to the first max pool (64-d).
    x = BasicConv2d(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv2d(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv2d(64, (3, 3), padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_s2(x)
    if emit(0, x):
      return outputs
    # Block 1: up to the second max pool (192-d).
    x = BasicConv2d(80, name='Conv2d_3b_1x1')(x)
    x = BasicConv2d(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_s2(x)
    if emit(1, x):
      return outputs
    # Block 2: up to the aux classifier input (768-d, 17x17).
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    if emit(2, x):
      return outputs
    # Block 3: up to pool3 (2048-d).
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE('avg', name='Mixed_7b')(x)
    x = InceptionE('max', name='Mixed_7c')(x)
    emit(3, x)
    return outputs


# The layers of each output block. pytorch-fid's `InceptionV3` wrapper stores
# them as blocks.i.j; the released .pth uses these (torchvision's) names.
BLOCK_LAYERS = {
    0: ['Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3'],
    1: ['Conv2d_3b_1x1', 'Conv2d_4a_3x3'],
    2: ['Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c',
        'Mixed_6d', 'Mixed_6e'],
    3: ['Mixed_7a', 'Mixed_7b', 'Mixed_7c'],
}


def canonical_name(key: str) -> str:
  """'blocks.2.0.branch1x1.conv.weight' -> 'Mixed_5b.branch1x1.conv.weight'."""
  m = re.match(r'blocks\.(\d+)\.(\d+)\.(.*)', key)
  if not m:
    return key
  block, idx, rest = int(m[1]), int(m[2]), m[3]
  return f'{BLOCK_LAYERS[block][idx]}.{rest}'


def params_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """Torch FID-Inception state dict (numpy or torch tensors) -> Flax params.

  Each `X.conv.weight` [O, I, kh, kw] with `X.bn.{weight,bias,running_mean,
  running_var}` becomes `X/conv/{kernel [kh, kw, I, O], bias [O]}` with the
  batch norm folded in (computed in float64). `fc.*` (the 1008-way
  classifier) and `AuxLogits.*` are not needed for features and are dropped.
  """
  sd = {canonical_name(k): np.asarray(v, dtype=np.float64)
        for k, v in state_dict.items()}
  params: dict = {}
  conv_keys = [k for k in sd if k.endswith('.conv.weight')]
  if not conv_keys:
    raise ValueError('Not an Inception state dict: no "*.conv.weight" entries.')
  for key in conv_keys:
    prefix = key[:-len('.conv.weight')]
    if prefix.startswith('AuxLogits'):
      continue
    try:
      gamma = sd[f'{prefix}.bn.weight']
      beta = sd[f'{prefix}.bn.bias']
      mean = sd[f'{prefix}.bn.running_mean']
      var = sd[f'{prefix}.bn.running_var']
    except KeyError as e:
      raise ValueError(f'State dict lacks batch-norm entry {e} for {prefix}.') from e
    scale = gamma / np.sqrt(var + BN_EPS)
    kernel = np.transpose(sd[key], (2, 3, 1, 0)) * scale  # OIHW -> HWIO.
    bias = beta - mean * scale
    node = params
    for part in prefix.split('.'):
      node = node.setdefault(part, {})
    node['conv'] = {'kernel': kernel.astype(np.float32),
                    'bias': bias.astype(np.float32)}
  return params
