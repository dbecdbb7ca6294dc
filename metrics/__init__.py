"""Sample-quality metrics: FID, KID (TF-Inception in Flax), AFD (anime faces) and
hair-colour attribute accuracy.

  from metrics import fid, kid, afd, attributes
  fid.fid('real_images/', 'fake_images/')        # or .npz statistics, arrays
  kid.kid('real_images/', 'fake_images/').mean
  afd.afd('fake_images/').rate
  attributes.attribute_accuracy(paths, ['blonde', 'red', ...]).accuracy

Command line: python -m metrics {fid,kid,afd,attributes,stats,hw6,convert-weights} --help.

Submodules load on first use, so `from metrics import afd` (or attributes)
pulls in neither JAX nor the Inception weights.
"""

import importlib

__all__ = ['afd', 'attributes', 'features', 'fid', 'inception', 'kid', 'weights']


def __getattr__(name):
  if name in __all__:
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
