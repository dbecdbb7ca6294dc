"""Torch-side references for the metrics tests and benchmarks, without downloads.

pytorch-fid's FID Inception with random weights (its constructor would
download the released ones), and helpers to run it on NHWC uint8 images.
"""

from __future__ import annotations

from common.torch_compat import patch_torchvision

patch_torchvision()  # Before pytorch_fid imports torchvision.

# pylint: disable=g-import-not-at-top,wrong-import-position
import torch
from pytorch_fid import inception as pfid_inception


def _random_fid_inception_v3():
  """pytorch-fid's `fid_inception_v3` without loading the released weights."""
  net = pfid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  net.Mixed_5b = pfid_inception.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = pfid_inception.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = pfid_inception.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = pfid_inception.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = pfid_inception.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = pfid_inception.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = pfid_inception.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = pfid_inception.FIDInceptionE_1(1280)
  net.Mixed_7c = pfid_inception.FIDInceptionE_2(2048)
  return net


def random_pytorch_fid_inception(seed: int = 0, dims: int = 2048, blocks=None):
  """pytorch-fid's InceptionV3 (FID variant) with random, non-trivial weights.

  Kaiming-normal convolutions and random batch-norm statistics give pool3
  features of order 1 (the default init gives ~1e-7, useless for parity).
  """
  torch.manual_seed(seed)
  original = pfid_inception.fid_inception_v3
  pfid_inception.fid_inception_v3 = _random_fid_inception_v3
  try:
    model = pfid_inception.InceptionV3(
        blocks or [pfid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
  finally:
    pfid_inception.fid_inception_v3 = original
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(m.weight)
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.1)
        m.running_mean.normal_(0.0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  return model.eval()


def raw_state_dict(model) -> dict:
  """The wrapper's state dict under torchvision's names, like the released .pth."""
  from metrics import inception  # pylint: disable=g-import-not-at-top
  return {inception.canonical_name(k): v for k, v in model.state_dict().items()}


def torch_features(model, images) -> list:
  """pytorch-fid's features of uint8 NHWC images (ToTensor: x / 255, NCHW)."""
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  with torch.no_grad():
    return [o.mean(dim=(2, 3)).numpy() for o in model(x)]


def state_dict_numpy(model) -> dict:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
