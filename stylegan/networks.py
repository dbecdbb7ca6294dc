"""StyleGAN2 generator and discriminator in Flax linen (NHWC).

Follows stylegan2-ada-pytorch (Karras et al. 2020, "Analyzing and Improving
the Image Quality of StyleGAN" and "Training GANs with Limited Data"):

* Equalised learning rate everywhere: weights are stored N(0, 1) / lr_mul and
  scaled by lr_mul / sqrt(fan_in) at run time, so Adam sees every layer at the
  same scale (and the mapping network learns 100x slower with lr_mul=0.01).
* Resampling with the separable [1, 3, 3, 1] low-pass filter (``upfirdn2d``),
  normalised to unit DC gain (x4 when upsampling by 2, to make up for the zeros inserted).
* Modulated convolutions with weight demodulation; ToRGB is modulated but not
  demodulated. Skip generator, residual discriminator with minibatch stddev.

The channel count at resolution r is min(channel_base // r, channel_max), as
in the reference. No conv clamping or fp16: both only matter for mixed precision.
"""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from stylegan.configs.base import NOISE_MODES  # The choice list lives with the config.

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)  # Keeps the activations' second moment through lrelu.
RESAMPLE_FILTER = (1, 3, 3, 1)


# ----------------------------------------------------------------------------
# Pure helpers.


def num_ws_for(resolution: int) -> int:
  """Number of w vectors the synthesis network consumes: one per conv + the last ToRGB."""
  log2 = int(math.log2(resolution))
  return 2 * log2 - 2


def channels_at(res: int, channel_base: int, channel_max: int) -> int:
  return min(channel_base // res, channel_max)


def setup_filter(f: Sequence[float] = RESAMPLE_FILTER) -> np.ndarray:
  """1-D taps normalised to sum 1; the 2-D filter is their outer product (separable)."""
  f = np.asarray(f, np.float64)
  return (f / f.sum()).astype(np.float32)


def _upfirdn_1d(x: jax.Array, f: np.ndarray, axis: int, up: int, down: int,
                padding: tuple[int, int], gain: float) -> jax.Array:
  if up > 1:  # Zero insertion: up-1 zeros after every sample.
    z = jnp.zeros_like(x)
    x = jnp.stack([x] + [z] * (up - 1), axis=axis + 1)
    shape = list(x.shape)
    x = x.reshape(shape[:axis] + [shape[axis] * up] + shape[axis + 2:])
  pads = [(0, 0)] * x.ndim
  pads[axis] = padding
  x = jnp.pad(x, pads)
  # True convolution with the (flipped) taps as a sum of shifted slices: on CPU
  # this is far cheaper, forward and backward, than a depthwise conv.
  taps = len(f)
  n = x.shape[axis] - taps + 1
  y = 0
  for k, c in enumerate(f[::-1]):
    y = y + float(c * gain) * jax.lax.slice_in_dim(x, k, k + n, axis=axis)
  if down > 1:
    y = jax.lax.slice_in_dim(y, 0, n, stride=down, axis=axis)
  return y


def upfirdn2d(x: jax.Array, f: np.ndarray, up: int = 1, down: int = 1,
              padding: tuple[int, int] = (0, 0), gain: float = 1.0) -> jax.Array:
  """Upsample (zero insertion), pad, FIR filter, downsample; NHWC, per channel.

  Same semantics as the reference's upfirdn2d with the separable filter
  outer(f, f) (true convolution; [1,3,3,1] is symmetric anyway). Output size
  per axis: (in * up + pad0 + pad1 - taps) // down + 1.
  """
  if padding[0] < 0 or padding[1] < 0:
    raise ValueError(f'upfirdn2d padding must be >= 0, got {padding}.')
  g = math.sqrt(gain)  # Split over the two axes.
  x = _upfirdn_1d(x, f, 1, up, down, padding, g)
  return _upfirdn_1d(x, f, 2, up, down, padding, g)


def upsample2d(x: jax.Array, f: np.ndarray, up: int = 2) -> jax.Array:
  """x2 upsampling that keeps the DC level: gain up**2 for the inserted zeros."""
  taps = len(f)
  return upfirdn2d(x, f, up=up, padding=((taps + up - 1) // 2, (taps - up) // 2),
                   gain=up * up)


def downsample2d(x: jax.Array, f: np.ndarray, down: int = 2) -> jax.Array:
  taps = len(f)
  return upfirdn2d(x, f, down=down, padding=((taps - down + 1) // 2, (taps - down) // 2))


def bias_act(x: jax.Array, b: jax.Array | None, act: str = 'linear',
             gain: float = 1.0) -> jax.Array:
  """Bias, then activation, then gain (sqrt(2) by default for lrelu)."""
  if b is not None:
    x = x + b
  if act == 'lrelu':
    return jax.nn.leaky_relu(x, LRELU_SLOPE) * (LRELU_GAIN * gain)
  if act == 'linear':
    return x * gain if gain != 1.0 else x
  raise ValueError(f'Unknown activation {act!r}.')


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1, padding='SAME') -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(stride, stride), padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def modulated_conv2d(x: jax.Array, weight: jax.Array, styles: jax.Array,
                     demodulate: bool = True, up: int = 1,
                     resample_filter: np.ndarray | None = None) -> jax.Array:
  """The StyleGAN2 modulated convolution (paper eqs. 1-3), NHWC.

  w'_ijk = s_i * w_ijk;  w''_ijk = w'_ijk / sqrt(sum_{i,k} w'_ijk^2 + 1e-8).
  Computed without per-sample weights: scale the input channels by s, run one
  shared convolution, scale the output channels by the demodulation
  coefficients (exactly equal, since both scalings are per channel).

  Args:
    x: [N, H, W, I] input.
    weight: [k, k, I, O] convolution weight.
    styles: [N, I] per-sample input-channel scales s.
    demodulate: normalise each output channel (not for ToRGB).
    up: 1, or 2 to upsample x with `resample_filter` first.
  """
  x = x * styles[:, None, None, :]
  if up > 1:
    x = upsample2d(x, resample_filter, up)
  x = conv2d(x, weight)
  if demodulate:
    # sum_{i,k} (s_i w_ijk)^2 = sum_i s_i^2 (sum_k w_ijk^2): an [N,I] x [I,O] product.
    wsq = jnp.sum(jnp.square(weight), axis=(0, 1))
    dcoefs = jax.lax.rsqrt(jnp.square(styles) @ wsq + 1e-8)
    x = x * dcoefs[:, None, None, :]
  return x


def normalize_2nd_moment(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def truncate(ws: jax.Array, w_avg: jax.Array, psi: float = 1.0,
             cutoff: int | None = None) -> jax.Array:
  """Truncation trick: pull the first `cutoff` ws (all if None) towards w_avg."""
  ws_trunc = w_avg + psi * (ws - w_avg)
  if cutoff is None:
    return ws_trunc
  layer = jnp.arange(ws.shape[1])[None, :, None]
  return jnp.where(layer < cutoff, ws_trunc, ws)


def update_w_avg(w_avg: jax.Array, ws: jax.Array, beta: float = 0.995) -> jax.Array:
  """Moving average of w (tracked during training, used for truncation).

  w_avg <- lerp(mean_batch(w), w_avg, beta): moves a fraction 1 - beta of the
  way to the batch mean. Accepts [N, w_dim] or broadcast [N, num_ws, w_dim].
  """
  w = ws[:, 0] if ws.ndim == 3 else ws
  return jnp.mean(w, axis=0) + beta * (w_avg - jnp.mean(w, axis=0))


def minibatch_std(x: jax.Array, group_size: int = 4, num_channels: int = 1) -> jax.Array:
  """Appends the stddev over groups of samples as extra feature map(s).

  Groups are *consecutive* samples (the reference groups with a stride), so
  with a batch sharded over devices each group stays on one device whenever
  the per-device batch is a multiple of the group size.
  """
  n, h, w, c = x.shape
  g = min(group_size, n)
  if n % g:
    raise ValueError(f'Batch size {n} is not a multiple of the mbstd group size {g}.')
  f = num_channels
  y = x.reshape(n // g, g, h, w, f, c // f)
  y = y - jnp.mean(y, axis=1, keepdims=True)
  y = jnp.sqrt(jnp.mean(jnp.square(y), axis=1) + 1e-8)  # [n/g, h, w, f, c/f]
  y = jnp.mean(y, axis=(1, 2, 4))                         # [n/g, f]
  y = jnp.repeat(y, g, axis=0)                            # [n, f]
  y = jnp.broadcast_to(y[:, None, None, :], (n, h, w, f)).astype(x.dtype)
  return jnp.concatenate([x, y], axis=-1)


def _normal_init(scale: float = 1.0):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype) * scale
  return init


# ----------------------------------------------------------------------------
# Layers with equalised learning rate.


class EqualDense(nn.Module):
  """Fully connected layer with equalised learning rate and lr multiplier."""
  features: int
  activation: str = 'linear'
  lr_multiplier: float = 1.0
  bias_init: float = 0.0

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    w = self.param('weight', _normal_init(1.0 / self.lr_multiplier), (fan_in, self.features))
    b = self.param('bias', nn.initializers.constant(self.bias_init / self.lr_multiplier),
                   (self.features,), jnp.float32)
    x = x @ (w * (self.lr_multiplier / math.sqrt(fan_in)))
    return bias_act(x, b * self.lr_multiplier, self.activation)


class EqualConv(nn.Module):
  """Conv with equalised learning rate and optional filtered x2 downsampling."""
  features: int
  kernel_size: int
  activation: str = 'linear'
  use_bias: bool = True
  down: int = 1

  @nn.compact
  def __call__(self, x, gain: float = 1.0):
    k, fan_in = self.kernel_size, x.shape[-1] * self.kernel_size ** 2
    w = self.param('weight', _normal_init(), (k, k, x.shape[-1], self.features))
    w = w * (1.0 / math.sqrt(fan_in))
    if self.down == 1:
      x = conv2d(x, w)
    else:
      f = setup_filter()
      if k == 1:  # Filter-downsample, then the 1x1 conv.
        x = conv2d(downsample2d(x, f, self.down), w)
      else:  # Low-pass with the conv's padding folded in, then a strided conv.
        taps, p = len(f), k // 2
        x = upfirdn2d(x, f, padding=(p + (taps - self.down + 1) // 2, p + (taps - self.down) // 2))
        x = conv2d(x, w, stride=self.down, padding='VALID')
    b = None
    if self.use_bias:
      b = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    return bias_act(x, b, self.activation, gain)


# ----------------------------------------------------------------------------
# Generator.


class MappingNetwork(nn.Module):
  """z -> w: normalised z through `num_layers` FC layers (lr multiplier 0.01)."""
  w_dim: int = 512
  num_layers: int = 8
  lr_multiplier: float = 0.01

  @nn.compact
  def __call__(self, z):
    x = normalize_2nd_moment(z)
    for i in range(self.num_layers):
      x = EqualDense(self.w_dim, 'lrelu', self.lr_multiplier, name=f'fc{i}')(x)
    return x


class SynthesisLayer(nn.Module):
  """Modulated 3x3 conv (+ optional upsampling), noise, bias, lrelu."""
  features: int
  resolution: int
  up: int = 1

  @nn.compact
  def __call__(self, x, w, noise_mode: str = 'random'):
    in_ch = x.shape[-1]
    styles = EqualDense(in_ch, bias_init=1.0, name='affine')(w)  # Styles start at 1.
    weight = self.param('weight', _normal_init(), (3, 3, in_ch, self.features))
    # No weight gain: demodulation normalises the weight scale anyway.
    x = modulated_conv2d(x, weight, styles, demodulate=True, up=self.up,
                         resample_filter=setup_filter())
    noise_strength = self.param('noise_strength', nn.initializers.zeros, (), jnp.float32)
    if noise_mode != 'none':
      shape = (x.shape[0], self.resolution, self.resolution, 1)
      if noise_mode == 'random':
        key = self.make_rng('noise')
      else:  # 'const': one fixed noise image per layer, the same for every sample.
        key = jax.random.key(_stable_hash(f'{self.resolution}/{self.name}'), impl='rbg')
        shape = (1,) + shape[1:]
      x = x + jax.random.normal(key, shape, x.dtype) * noise_strength
    b = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    return bias_act(x, b, 'lrelu')


def _stable_hash(s: str) -> int:
  """Same value in every process and run (unlike hash())."""
  return zlib.crc32(s.encode()) & 0x7FFFFFFF


class ToRGB(nn.Module):
  """Modulated (not demodulated) 1x1 conv to RGB; equalised lr via the styles."""
  channels: int = 3

  @nn.compact
  def __call__(self, x, w):
    in_ch = x.shape[-1]
    styles = EqualDense(in_ch, bias_init=1.0, name='affine')(w) * (1.0 / math.sqrt(in_ch))
    weight = self.param('weight', _normal_init(), (1, 1, in_ch, self.channels))
    x = modulated_conv2d(x, weight, styles, demodulate=False)
    b = self.param('bias', nn.initializers.zeros, (self.channels,), jnp.float32)
    return bias_act(x, b, 'linear')


class SynthesisBlock(nn.Module):
  """One resolution of the skip generator: (const | up-conv) -> conv -> ToRGB."""
  features: int
  resolution: int

  @nn.compact
  def __call__(self, x, img, ws, noise_mode: str = 'random'):
    # ws: [N, num_conv + 1, w_dim]; the last one (shared with the next block's
    # first conv) drives ToRGB.
    i = 0
    if self.resolution == 4:
      const = self.param('const', _normal_init(), (4, 4, self.features))
      x = jnp.broadcast_to(const[None], (ws.shape[0], 4, 4, self.features))
    else:
      x = SynthesisLayer(self.features, self.resolution, up=2, name='conv0')(
          x, ws[:, i], noise_mode)
      i += 1
    x = SynthesisLayer(self.features, self.resolution, name='conv1')(x, ws[:, i], noise_mode)
    i += 1
    y = ToRGB(name='torgb')(x, ws[:, i])
    img = y if img is None else upsample2d(img, setup_filter()) + y
    return x, img


class SynthesisNetwork(nn.Module):
  """ws [N, num_ws, w_dim] -> images [N, R, R, 3], roughly in [-1, 1]."""
  resolution: int = 64
  channel_base: int = 16384
  channel_max: int = 512

  @nn.compact
  def __call__(self, ws, noise_mode: str = 'random'):
    check_resolution(self.resolution)
    if noise_mode not in NOISE_MODES:
      raise ValueError(f'noise_mode={noise_mode!r} is not one of {NOISE_MODES}.')
    if ws.shape[1] != num_ws_for(self.resolution):
      raise ValueError(f'Expected {num_ws_for(self.resolution)} ws, got {ws.shape[1]}.')
    x = img = None
    w_idx = 0
    res = 4
    while res <= self.resolution:
      num_conv = 1 if res == 4 else 2
      block = SynthesisBlock(channels_at(res, self.channel_base, self.channel_max), res,
                             name=f'b{res}')
      x, img = block(x, img, ws[:, w_idx:w_idx + num_conv + 1], noise_mode)
      w_idx += num_conv
      res *= 2
    return img


class Generator(nn.Module):
  """Mapping + synthesis. Call `mapping` and `synthesis` separately via apply(method=...)."""
  resolution: int = 64
  z_dim: int = 512
  w_dim: int = 512
  mapping_layers: int = 8
  mapping_lr_multiplier: float = 0.01
  channel_base: int = 16384
  channel_max: int = 512

  @property
  def num_ws(self) -> int:
    return num_ws_for(self.resolution)

  def setup(self):
    check_resolution(self.resolution)
    self.mapping_net = MappingNetwork(self.w_dim, self.mapping_layers, self.mapping_lr_multiplier)
    self.synthesis_net = SynthesisNetwork(self.resolution, self.channel_base, self.channel_max)

  def mapping(self, z, w_avg=None, psi: float = 1.0, cutoff: int | None = None):
    """z [N, z_dim] -> ws [N, num_ws, w_dim], truncated if psi != 1 (needs w_avg)."""
    w = self.mapping_net(z)
    ws = jnp.broadcast_to(w[:, None, :], (w.shape[0], self.num_ws, self.w_dim))
    if w_avg is not None:
      ws = truncate(ws, w_avg, psi, cutoff)
    return ws

  def synthesis(self, ws, noise_mode: str = 'random'):
    return self.synthesis_net(ws, noise_mode)

  def __call__(self, z, w_avg=None, psi: float = 1.0, cutoff: int | None = None,
               noise_mode: str = 'random'):
    return self.synthesis(self.mapping(z, w_avg, psi, cutoff), noise_mode)


# ----------------------------------------------------------------------------
# Discriminator.


class DiscriminatorBlock(nn.Module):
  """Residual block: [fromRGB] -> conv -> conv(down) plus a 1x1 down skip, / sqrt(2)."""
  tmp_features: int
  out_features: int
  first: bool = False

  @nn.compact
  def __call__(self, x):
    if self.first:
      x = EqualConv(self.tmp_features, 1, 'lrelu', name='fromrgb')(x)
    y = EqualConv(self.out_features, 1, use_bias=False, down=2, name='skip')(x, gain=math.sqrt(0.5))
    x = EqualConv(self.tmp_features, 3, 'lrelu', name='conv0')(x)
    x = EqualConv(self.out_features, 3, 'lrelu', down=2, name='conv1')(x, gain=math.sqrt(0.5))
    return x + y


class Discriminator(nn.Module):
  """Images [N, R, R, 3] in [-1, 1] -> logits [N]."""
  resolution: int = 64
  channel_base: int = 16384
  channel_max: int = 512
  mbstd_group_size: int = 4
  mbstd_num_channels: int = 1

  @nn.compact
  def __call__(self, img):
    check_resolution(self.resolution)
    if img.shape[1:3] != (self.resolution, self.resolution):
      raise ValueError(f'Discriminator for {self.resolution}px got images of shape {img.shape}.')
    ch = lambda r: channels_at(r, self.channel_base, self.channel_max)
    x = img
    res = self.resolution
    while res > 4:
      x = DiscriminatorBlock(ch(res), ch(res // 2), first=res == self.resolution,
                             name=f'b{res}')(x)
      res //= 2
    # Epilogue at 4x4.
    x = minibatch_std(x, self.mbstd_group_size, self.mbstd_num_channels)
    x = EqualConv(ch(4), 3, 'lrelu', name='conv')(x)
    x = EqualDense(ch(4), 'lrelu', name='fc')(x.reshape(x.shape[0], -1))
    return EqualDense(1, name='out')(x)[:, 0]


def check_resolution(resolution: int) -> None:
  if resolution < 32 or resolution > 256 or resolution & (resolution - 1):
    raise ValueError(
        f'StyleGAN resolution must be a power of two from 32 to 256, got {resolution}.')
