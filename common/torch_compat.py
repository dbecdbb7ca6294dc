"""Import-time workaround for PyPI's CUDA-only torchvision on a CPU torch.

Only tests and benchmarks import the PyTorch peers (diffusers, pytorch-fid).
PyPI's torchvision is built for CUDA; with the CPU torch wheel its import dies
registering ``torchvision::nms`` meta kernels, and diffusers' model imports
die with it. Pre-registering an empty ``torchvision._meta_registrations``
skips that registration; nothing we use needs it.
"""

import sys
import types


def patch_torchvision() -> None:
  """Call before importing torch-side libraries (diffusers, pytorch_fid)."""
  sys.modules.setdefault('torchvision._meta_registrations',
                         types.ModuleType('torchvision._meta_registrations'))
