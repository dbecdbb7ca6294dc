"""Where XLA's convolution kernels lose to PyTorch on CPU: the kernel (weight) gradient.

  python benchmarks/bench_conv_grads.py grads      # each way of computing dW, per shape
  python benchmarks/bench_conv_grads.py callback   # the ddpm train step with PyTorch's dW

`grads`: the gradient of a 3x3 convolution's kernel at the cifar10 U-Net's shapes, computed
by XLA (autodiff: a convolution with batch and features swapped), as one im2col matmul, as
nine shifted matmuls, and by PyTorch's oneDNN (`aten.convolution_backward`), in interleaved
rounds; prints ms and GFLOP/s and the largest difference from XLA's.

`callback`: bench_ddpm's train step against diffusers', with flax's convolutions given a
custom_vjp whose kernel gradient runs PyTorch's kernel through `jax.pure_callback`, then
without it (a fresh process each). The path that would beat XLA's kernel here;
RESULTS.md, "ddpm", says why it is not adopted.
"""

import argparse
import functools
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_ddpm  # pylint: disable=wrong-import-position  (patches torchvision first)
import torch  # pylint: disable=wrong-import-position,g-bad-import-order

SHAPES = ((16, 32, 32, 256, 256), (16, 32, 32, 384, 128), (16, 32, 32, 128, 128),
          (16, 16, 16, 512, 256), (16, 8, 8, 256, 256))  # B, H, W, C_in, C_out


def conv(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def dw_xla(x, dy, k):
  return jax.vjp(lambda k: conv(x, k), k)[1](dy)[0]


def _shifted(x):
  """The nine 3x3 taps of x (padding 1), each [B*H*W, C]."""
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [xp[:, i:i + h, j:j + w].reshape(-1, c) for i in range(3) for j in range(3)]


def dw_im2col(x, dy):
  patches = jnp.concatenate(_shifted(x), -1)
  dw = jax.lax.dot_general(patches, dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ())))
  return dw.reshape(3, 3, x.shape[-1], -1)


def dw_nine(x, dy):
  d = dy.reshape(-1, dy.shape[-1])
  taps = [jax.lax.dot_general(t, d, (((0,), (0,)), ((), ()))) for t in _shifted(x)]
  return jnp.stack(taps).reshape(3, 3, x.shape[-1], -1)


def torch_dw(x, dy, k_shape, strides=(1, 1), padding=(1, 1)):
  """PyTorch's kernel gradient of an NHWC/HWIO convolution, as HWIO. The NHWC arrays are
  used in place, as channels-last NCHW views."""
  with warnings.catch_warnings():  # They are read-only; nothing writes to them.
    warnings.simplefilter('ignore', UserWarning)
    xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)
    dyt = torch.from_numpy(np.asarray(dy)).permute(0, 3, 1, 2)
  weight = torch.empty(k_shape[3], k_shape[2], k_shape[0], k_shape[1])  # Only its shape is read.
  dw = torch.ops.aten.convolution_backward(dyt, xt, weight, None, strides, padding, (1, 1), False,
                                           (0, 0), 1, (False, True, False))[1]
  return dw.permute(2, 3, 1, 0).contiguous().numpy()


def grads(repeats):
  for b, h, w, ci, co in SHAPES:
    x = jax.random.normal(jax.random.PRNGKey(0), (b, h, w, ci))
    dy = jax.random.normal(jax.random.PRNGKey(1), (b, h, w, co))
    k = jnp.zeros((3, 3, ci, co))
    xla, im2col, nine = jax.jit(dw_xla), jax.jit(dw_im2col), jax.jit(dw_nine)
    ref = xla(x, dy, k)
    error = lambda out: float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    errors = {'im2col': error(im2col(x, dy)), 'nine': error(nine(x, dy)),
              'torch': error(torch_dw(x, dy, k.shape))}
    t = bench_ddpm.interleaved({
        'xla': lambda: xla(x, dy, k).block_until_ready(),
        'im2col': lambda: im2col(x, dy).block_until_ready(),
        'nine': lambda: nine(x, dy).block_until_ready(),
        'torch': lambda: torch_dw(x, dy, k.shape)}, repeats, gap=0.5)
    gflop = 2 * b * h * w * ci * co * 9 / 1e9
    print(f'{b}x{h}x{w}, {ci} -> {co}: ' + ', '.join(
        f'{name} {s * 1e3:.0f} ms ({gflop / s:.0f} GFLOP/s)' for name, s in t.items())
        + f'; largest difference from XLA {max(errors.values()):.1e}', flush=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _conv_torch_dw(x, k, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                   feature_group_count):
  return jax.lax.conv_general_dilated(x, k, strides, padding, lhs_dilation, rhs_dilation,
                                      dimension_numbers, feature_group_count)


def _conv_fwd(x, k, *static):
  return _conv_torch_dw(x, k, *static), (x, k)


def _conv_bwd(strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
              feature_group_count, residuals, dy):
  x, k = residuals
  _, vjp_x = jax.vjp(lambda x: jax.lax.conv_general_dilated(
      x, k, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count), x)
  assert all(lo == hi for lo, hi in padding) and feature_group_count == 1
  dw = jax.pure_callback(
      functools.partial(torch_dw, k_shape=k.shape, strides=strides,
                        padding=tuple(lo for lo, _ in padding)),
      jax.ShapeDtypeStruct(k.shape, k.dtype), x, dy)
  return vjp_x(dy)[0], dw


_conv_torch_dw.defvjp(_conv_fwd, _conv_bwd)


def use_torch_dw():
  """Routes every flax nn.Conv through `_conv_torch_dw` (flax calls lax.conv_general_dilated
  through its module's `lax`; the rest of lax stays)."""
  import flax.linen.linear as flax_linear  # pylint: disable=g-import-not-at-top

  def call(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, **unused):
    as_tuple = lambda v: None if v is None else tuple(v)
    return _conv_torch_dw(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)),
                          as_tuple(lhs_dilation), as_tuple(rhs_dilation), dimension_numbers,
                          feature_group_count)

  names = {n: getattr(jax.lax, n) for n in dir(jax.lax) if not n.startswith('__')}
  flax_linear.lax = types.SimpleNamespace(**{**names, 'conv_general_dilated': call})


def callback(repeats, plain):
  if not plain:
    use_torch_dw()
  ours, _, model, _, _ = bench_ddpm.train_step_fn(16, jax.devices()[:1])
  t = bench_ddpm.interleaved({'ours': ours, 'theirs': bench_ddpm.torch_train_step_fn(model, 16)},
                             repeats)
  print(f'train step, kernel gradient by {"XLA" if plain else "PyTorch (callback)"}: ours '
        f'{t["ours"]:.3f} s, diffusers {t["theirs"]:.3f} s, ratio {t["theirs"] / t["ours"]:.2f}x',
        flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('what', choices=('grads', 'callback'))
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--only', choices=('torch', 'xla'),
                      help='callback: one kernel gradient (default: both, one process each, '
                      'since the patch is global).')
  args = parser.parse_args()
  # PyTorch counts the machine's cores, not the ones `taskset` leaves: more threads than cores
  # slow both its kernels and the callback's.
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  if args.what == 'grads':
    grads(args.repeats)
  elif args.only:
    callback(args.repeats, plain=args.only == 'xla')
  else:
    for only in ('torch', 'xla'):
      subprocess.run([sys.executable, __file__, 'callback', '--repeats', str(args.repeats),
                      '--only', only], check=True)


if __name__ == '__main__':
  main()
