"""Command line: python -m metrics {fid,kid,afd,diversity,attributes,stats,hw6,
convert-weights,download-weights}.

  python -m metrics fid REAL FAKE            # folders or .npz statistics
  python -m metrics kid REAL FAKE
  python -m metrics afd FAKE --csv afd.csv
  python -m metrics diversity REAL FAKE      # sample variety relative to the data
  python -m metrics attributes FAKE          # hair colour vs FAKE/captions.tsv
  python -m metrics stats FOLDER OUT.npz     # reference statistics, once
  python -m metrics hw6 REAL FAKE            # FID and AFD in one line
  python -m metrics convert-weights pt_inception-2015-12-05-6726825d.pth OUT.npz
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _add_inception_args(p: argparse.ArgumentParser) -> None:
  p.add_argument('--dims', type=int, default=2048, choices=(64, 192, 768, 2048),
                 help='Inception features: 2048 = pool3 (standard FID).')
  p.add_argument('--batch-size', type=int, default=50)
  p.add_argument('--resize', default='bilinear', choices=('bilinear', 'clean'),
                 help="bilinear: pytorch-fid's torch resize (default); clean: clean-fid's "
                      'PIL bicubic.')
  p.add_argument('--weights', default=None,
                 help='Inception weights (.pth/.npz); default: $FID_INCEPTION_WEIGHTS, '
                      'the cache (~/.cache/jaxgen), else download.')
  p.add_argument('--max-images', type=int, default=None, help='Use the first N images only.')


def _add_afd_args(p: argparse.ArgumentParser) -> None:
  p.add_argument('--detector', default='animeface', choices=('animeface', 'yolo'))
  p.add_argument('--yolo-weights', default=None, help='yolov8x6_animeface.pt (detector=yolo).')
  p.add_argument('--min-size', type=int, default=None,
                 help='Upscale images whose short side is below this (integer factor; '
                      'animeface default 96, yolo 0 = never).')
  p.add_argument('--border', type=float, default=None,
                 help='White border, fraction of the side (animeface default 0.25, yolo 0).')
  p.add_argument('--csv', default=None, help='Write per-image face counts and likelihoods.')


def _extractor_kwargs(args) -> dict:
  return dict(weights=args.weights, batch_size=args.batch_size, resize=args.resize)


def _detector_kwargs(args) -> dict:
  kw = {}
  if args.min_size is not None:
    kw['min_size'] = args.min_size
  if args.border is not None:
    kw['border'] = args.border
  if args.detector == 'yolo':
    kw['weights'] = args.yolo_weights
  return kw


def _cmd_fid(args) -> None:
  from metrics import fid  # pylint: disable=g-import-not-at-top
  value = fid.fid(args.real, args.fake, dims=args.dims, max_images=args.max_images,
                  progress=not args.quiet, **_extractor_kwargs(args))
  print(f'FID: {value:.4f}')


def _cmd_kid(args) -> None:
  from metrics import kid  # pylint: disable=g-import-not-at-top
  r = kid.kid(args.real, args.fake, dims=args.dims, max_images=args.max_images,
              num_subsets=args.subsets, subset_size=args.subset_size, seed=args.seed,
              progress=not args.quiet, **_extractor_kwargs(args))
  print(f'KID: {r.mean:.6f} +- {r.std:.6f} ({r.num_subsets} subsets of {r.subset_size})')


def _cmd_afd(args) -> None:
  from metrics import afd  # pylint: disable=g-import-not-at-top
  r = afd.afd(args.fake, detector=args.detector, csv_path=args.csv, max_images=args.max_images,
              progress=not args.quiet, **_detector_kwargs(args))
  print(f'AFD: {r.rate:.4f} ({r.num_detected}/{r.num_images} images with a face, {r.detector})')
  if args.csv:
    print(f'Per-image results: {args.csv}')


def _cmd_attributes(args) -> None:
  from metrics import attributes  # pylint: disable=g-import-not-at-top
  paths, captions = attributes.read_captions(args.folder, args.captions)
  paths, captions = paths[:args.max_images], captions[:args.max_images]
  kept, targets = attributes.captioned_targets(paths, captions)
  if not kept:
    raise ValueError(f'None of the {len(paths)} captions names a single hair colour '
                     f'({", ".join(attributes.HAIR_COLOURS)}).')
  r = attributes.attribute_accuracy(kept, targets, csv_path=args.csv, progress=not args.quiet)
  print(f'Hair-colour accuracy: {r.accuracy:.4f} ({r.num_correct}/{r.num_detected} images with '
        f'a face)')
  print(f'Chance level: {r.chance:.4f} (always "{r.majority}"); balanced accuracy '
        f'{r.balanced_accuracy:.4f}')
  print(f'Detection rate: {r.detection_rate:.4f} ({r.num_detected}/{r.num_images} images; '
        f'{len(paths) - len(kept)} of {len(paths)} captions name no single hair colour, skipped)')
  confused = ', '.join(f'{t}->{d} ({n})' for t, d, n in r.most_confused(3))
  if confused:
    print(f'Most confused (caption->detected): {confused}')
  if args.csv:
    print(f'Per-image results: {args.csv}')


def _cmd_diversity(args) -> None:
  from common import imageio  # pylint: disable=g-import-not-at-top
  from metrics import diversity  # pylint: disable=g-import-not-at-top
  fake, _ = imageio.load_images(args.fake, max_images=args.max_images)
  real, _ = imageio.load_images(args.real, size=fake.shape[1], max_images=args.max_images)
  d_fake, d_real = diversity.pairwise_distance(fake), diversity.pairwise_distance(real)
  print(f'Diversity: {d_fake / d_real:.4f} (mean pairwise RMS distance {d_fake:.4f} of '
        f'{len(fake)} samples vs {d_real:.4f} of {len(real)} real images at {fake.shape[1]} px)')


def _cmd_stats(args) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from metrics import fid  # pylint: disable=g-import-not-at-top
  out = Path(args.out)
  if out.exists() and not args.force:
    raise FileExistsError(f'{out} exists; pass --force to overwrite.')
  feats = fid.compute_features(args.folder, args.dims, max_images=args.max_images,
                               progress=not args.quiet, **_extractor_kwargs(args))
  stats = fid.statistics_of_features(feats)
  path = stats.save(out)
  if args.features:  # Same file, plus per-image features for KID.
    np.savez_compressed(path, mu=stats.mu, sigma=stats.sigma,
                        num_images=np.int64(stats.num_images), features=feats)
  print(f'Saved {args.dims}-d statistics of {stats.num_images} images to {path}')


def _cmd_hw6(args) -> int:
  """AFD, then FID; without Inception weights, AFD alone with exit status 1 (partial)."""
  from metrics import afd, fid, weights  # pylint: disable=g-import-not-at-top
  r = afd.afd(args.fake, detector=args.detector, csv_path=args.csv, max_images=args.max_images,
              progress=not args.quiet, **_detector_kwargs(args))
  afd_text = f'AFD: {r.rate:.4f} ({r.num_detected}/{r.num_images}, {r.detector})'
  try:
    fid_value = fid.fid(args.real, args.fake, dims=2048, max_images=args.max_images,
                        progress=not args.quiet, **_extractor_kwargs(args))
  except weights.WeightsNotFoundError as e:
    print(f'FID: skipped  {afd_text}')
    print(f'error: FID skipped: {e}', file=sys.stderr)
    return 1
  print(f'FID: {fid_value:.4f}  {afd_text}')
  return 0


def _cmd_convert(args) -> None:
  from metrics import weights  # pylint: disable=g-import-not-at-top
  print(f'Wrote {weights.convert(args.src, args.dest)}')


def _cmd_download(args) -> None:
  from metrics import weights  # pylint: disable=g-import-not-at-top
  if args.dest:
    dest = Path(args.dest)
    path = dest if dest.is_file() else weights.download(dest)
  else:
    path = weights.find_weights()  # Downloads only when no copy is found.
  print(f'Weights at {path}')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m metrics', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('-q', '--quiet', action='store_true', help='No progress bars.')
  parser.add_argument('-v', '--verbose', action='store_true')
  # -q/-v are also accepted after the subcommand; SUPPRESS keeps the top-level value otherwise.
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('-q', '--quiet', action='store_true', default=argparse.SUPPRESS,
                      help='No progress bars.')
  common.add_argument('-v', '--verbose', action='store_true', default=argparse.SUPPRESS)
  sub = parser.add_subparsers(dest='command', required=True)
  add_parser = sub.add_parser
  sub.add_parser = lambda *a, **kw: add_parser(*a, parents=[common], **kw)

  p = sub.add_parser('fid', help='FID between two folders / .npz statistics.')
  p.add_argument('real')
  p.add_argument('fake')
  _add_inception_args(p)
  p.set_defaults(func=_cmd_fid)

  p = sub.add_parser('kid', help='KID between two folders (or feature .npz files).')
  p.add_argument('real')
  p.add_argument('fake')
  _add_inception_args(p)
  p.add_argument('--subsets', type=int, default=100)
  p.add_argument('--subset-size', type=int, default=1000)
  p.add_argument('--seed', type=int, default=0)
  p.set_defaults(func=_cmd_kid)

  p = sub.add_parser('afd', help='Anime-face detection rate of a folder.')
  p.add_argument('fake')
  p.add_argument('--max-images', type=int, default=None)
  _add_afd_args(p)
  p.set_defaults(func=_cmd_afd)

  p = sub.add_parser('attributes', help='Hair-colour accuracy of a folder against its captions.')
  p.add_argument('folder', help='Images, with captions.tsv (columns file, caption).')
  p.add_argument('--captions', default=None, help='Captions TSV (default: FOLDER/captions.tsv).')
  p.add_argument('--max-images', type=int, default=None, help='First N caption rows only.')
  p.add_argument('--csv', default=None,
                 help='Write per-image file, target, detected colour, hair RGB, likelihood.')
  p.set_defaults(func=_cmd_attributes)

  p = sub.add_parser('diversity', help='Mean pairwise distance of FAKE relative to REAL '
                     '(1 = as varied as the data, 0 = collapsed).')
  p.add_argument('real')
  p.add_argument('fake')
  p.add_argument('--max-images', type=int, default=1000, help='First N images of each.')
  p.set_defaults(func=_cmd_diversity)

  p = sub.add_parser('stats', help="Save a folder's FID statistics (pytorch-fid .npz).")
  p.add_argument('folder')
  p.add_argument('out')
  _add_inception_args(p)
  p.add_argument('--features', action='store_true', help='Also store per-image features (KID).')
  p.add_argument('--force', action='store_true', help='Overwrite OUT.')
  p.set_defaults(func=_cmd_stats)

  p = sub.add_parser('hw6', help='The HW6 check: FID (vs REAL folder or .npz) and AFD of FAKE.')
  p.add_argument('real')
  p.add_argument('fake')
  _add_inception_args(p)
  _add_afd_args(p)
  p.set_defaults(func=_cmd_hw6)

  p = sub.add_parser('convert-weights', help='.pth -> torch-free .npz / .safetensors.')
  p.add_argument('src')
  p.add_argument('dest')
  p.set_defaults(func=_cmd_convert)

  p = sub.add_parser('download-weights', help='Fetch the Inception weights into the cache.')
  p.add_argument('--dest', default=None)
  p.set_defaults(func=_cmd_download)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                      format='%(levelname)s: %(message)s')
  from common.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    return args.func(args) or 0
  except (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError,
          ValueError, RuntimeError) as e:
    # Expected failures (missing folder/weights, broken detector): message, no traceback.
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
