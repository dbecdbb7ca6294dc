"""Hair-colour attribute accuracy: caption parsing, the palette, scoring, real faces, CLI."""

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from common import imageio
from conftest import shared_path
from metrics import __main__ as cli
from metrics import afd, attributes

# Held-out rows of the tagged set (the palette was fitted on rows 0-2999).
HELD_OUT_ROWS = slice(3000, 3200)


@pytest.mark.parametrize('caption, colour', [
    ('blonde long hair and blue eyes', 'blonde'),
    ('red short hair and blue eyes', 'red'),  # Eye colours use the same words.
    ('long purple hair and black eyes', 'purple'),
    ('red hair and green eyes', 'red'),
    ('green long hair and green eyes', 'green'),
    ('aqua hair', 'aqua'),
    ('orange long hair', 'orange'),
    ('short gray hair', 'gray'),
    ('white long short hair and pink eyes', 'white'),
    ('brown hair and bicolored eyes', 'brown'),
    ('black long hair and bicolored blue eyes', 'black'),
    ('pink short hair and blue purple eyes', 'pink'),
    ('blue eyes and red hair', 'red'),  # Either order, commas too.
    ('red and blue hair', None),
    ('Blond hair, grey eyes', 'blonde'),
    ('grey hair', 'gray'),
    ('yellow hair', 'blonde'),  # Only ever an eye colour in the data: scored as blonde.
    ('short hair', None),
    ('long short hair and blue eyes', None),
    ('blue eyes', None),
    ('bicolored eyes', None),
    ('yellow eyes', None),
    ('', None),
    ('black blonde long hair and blue eyes', None),  # Conflicting tags: no single target.
])
def test_hair_colour_from_caption(caption, colour):
  assert attributes.hair_colour_from_caption(caption) == colour


def test_hair_colours_from_caption_keeps_every_hair_tag():
  assert attributes.hair_colours_from_caption(
      'blonde long pink short hair and green yellow eyes') == ('blonde', 'pink')
  assert attributes.hair_colours_from_caption(
      'black blonde blue long red short white hair and bicolored black red eyes') == (
          'black', 'blonde', 'blue', 'red', 'white')
  assert attributes.hair_colours_from_caption('blue blue hair and blue eyes') == ('blue',)


def test_captions_of_the_real_sets_parse():
  """Every caption: its hair colours are the colour words before "hair"."""
  for name, single in (('anime_faces_mlds96_tagged', 4647), ('anime_faces_mlds96', 2094)):
    paths, captions = attributes.read_captions(shared_path('data', name))
    assert len(paths) == len(captions) and paths[0].is_file()
    for caption in captions:
      words = caption.split()
      before_hair = words[:words.index('hair')] if 'hair' in words else []
      expected = [attributes.canonical_colour(w) for w in before_hair if w not in ('long', 'short')]
      assert None not in expected, caption  # No unknown word in a hair phrase.
      assert attributes.hair_colours_from_caption(caption) == tuple(dict.fromkeys(expected))
    assert sum(attributes.hair_colour_from_caption(c) is not None for c in captions) == single


def test_palette_covers_the_targets():
  assert tuple(attributes.PALETTE) == attributes.TARGET_COLOURS
  assert set(attributes.TARGET_COLOURS) | set(attributes.COLOUR_ALIASES) >= set(
      attributes.HAIR_COLOURS)
  assert attributes.SPACE in attributes.COLOUR_SPACES


@pytest.mark.parametrize('space', sorted(attributes.COLOUR_SPACES))
def test_palette_colours_map_to_their_names(space):
  names = list(attributes.PALETTE)
  rgbs = np.array([attributes.PALETTE[n] for n in names])
  assert attributes.nearest_colour(rgbs, space=space).tolist() == names
  nudged = np.clip(rgbs + np.array([2, -2, 1]), 0, 255)
  assert attributes.nearest_colour(nudged, space=space).tolist() == names
  assert attributes.nearest_colour(rgbs.reshape(3, 4, 3), space=space).shape == (3, 4)


def test_colour_spaces():
  np.testing.assert_allclose(attributes.srgb_to_lab([255, 255, 255]), [100, 0, 0], atol=0.01)
  np.testing.assert_allclose(attributes.srgb_to_lab([0, 0, 0]), [0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(attributes.srgb_to_lab([255, 0, 0]), [53.24, 80.09, 67.20], atol=0.05)
  # Hue is circular: red just below 360 deg is next to red just above 0.
  a, b, c = attributes.srgb_to_hsv_cone([[255, 0, 8], [255, 8, 0], [255, 128, 0]])
  assert np.linalg.norm(a - b) < 0.1 < np.linalg.norm(b - c)
  np.testing.assert_allclose(attributes.srgb_to_hsv_cone([128, 128, 128]), [0, 0, 128 / 255])
  with pytest.raises(ValueError, match='Unknown colour space'):
    attributes.nearest_colour([0, 0, 0], space='xyz')


def test_fit_palette_takes_the_median_per_name():
  rgbs = [(10, 10, 10), (20, 20, 20), (250, 10, 10), (30, 30, 30), (200, 0, 0)]
  names = ['black', 'black', 'red', 'black', 'red']
  assert attributes.fit_palette(rgbs, names) == {'black': (20, 20, 20), 'red': (225, 5, 5)}
  assert attributes.fit_palette(rgbs, names, 'mean')['red'] == (225, 5, 5)


def _detections(pairs):
  return [attributes.HairDetection(name, None if name is None else attributes.PALETTE[name], 0.9)
          for name in pairs]


def test_scoring_accuracy_chance_and_confusion(tmp_path):
  targets = ['red', 'red', 'red', 'blue', 'blue', 'pink']
  found = _detections(['red', 'pink', None, 'blue', 'aqua', 'pink'])
  r = attributes.score_hair_colours(found, targets, [f'{i}.png' for i in range(6)])
  assert (r.num_images, r.num_detected, r.num_correct) == (6, 5, 3)
  assert r.accuracy == pytest.approx(3 / 5) and r.detection_rate == pytest.approx(5 / 6)
  assert r.chance == pytest.approx(2 / 5) and r.majority in ('red', 'blue')  # 2 each.
  assert r.balanced_accuracy == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
  i = {n: k for k, n in enumerate(r.names)}
  assert r.confusion.sum() == 5 and r.confusion[i['red'], i['pink']] == 1
  assert sorted(r.most_confused()) == [('blue', 'aqua', 1), ('red', 'pink', 1)]
  r.write_csv(tmp_path / 'rows.csv')
  with open(tmp_path / 'rows.csv') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['file', 'target', 'detected', 'r', 'g', 'b', 'likelihood']
  assert rows[2]['detected'] == '' and rows[2]['r'] == ''  # No face.
  assert rows[1]['detected'] == 'pink' and int(rows[1]['r']) == attributes.PALETTE['pink'][0]


def test_errors(tmp_path):
  never = type('NeverCalled', (), {})()  # Targets are checked before any detection.
  with pytest.raises(ValueError, match=r"Unknown hair colour.*'purpel'.*valid: blonde, brown"):
    attributes.attribute_accuracy(np.zeros((2, 8, 8, 3), np.uint8), ['red', 'purpel'],
                                  detector=never)
  with pytest.raises(ValueError, match='2 images but 3 target colours'):
    attributes.attribute_accuracy(np.zeros((2, 8, 8, 3), np.uint8), ['red'] * 3, detector=never)
  with pytest.raises(imageio.NoImagesError):
    attributes.attribute_accuracy([], [], detector=never)
  with pytest.raises(imageio.NoImagesError):
    attributes.check_targets([])
  with pytest.raises(ValueError, match='Unknown hair colour'):
    attributes.check_targets([None])
  assert attributes.check_targets(['Grey', 'blond', 'yellow']) == ['gray', 'blonde', 'blonde']
  with pytest.raises(FileNotFoundError, match='captions.tsv'):
    attributes.read_captions(tmp_path)
  imageio.write_numbered(np.zeros((2, 8, 8, 3), np.uint8), tmp_path, ext='png')
  (tmp_path / 'captions.tsv').write_text('name\ttext\n1.png\tred hair\n')
  with pytest.raises(ValueError, match='header'):
    attributes.read_captions(tmp_path)
  (tmp_path / 'captions.tsv').write_text('file\tcaption\n1.png\tred hair\n9.png\tblue hair\n')
  with pytest.raises(FileNotFoundError, match=r"1 captioned file.*'9.png'"):
    attributes.read_captions(tmp_path)


def test_synthetic_faces_in_palette_colours():
  """End to end without data: afd's drawn face, its hair repainted in each palette
  colour, is detected as that colour, and the result is the same on every run."""
  face = np.asarray(afd.synthetic_face(128))
  hair = (face == (90, 50, 30)).all(-1)
  images = []
  for rgb in attributes.PALETTE.values():
    image = face.copy()
    image[hair] = rgb
    images.append(image)
  r = attributes.attribute_accuracy(np.stack(images), list(attributes.PALETTE))
  assert r.detection_rate == 1.0 and r.accuracy == 1.0, r.most_confused()
  again = attributes.detect_hair_colours([Image.fromarray(im) for im in images[::-1]])
  assert [d.rgb for d in again] == [row.rgb for row in r.per_image][::-1]  # Order-independent.


def test_real_faces_well_above_chance():
  paths, captions = attributes.read_captions(shared_path('data', 'anime_faces_mlds96_tagged'))
  paths, targets = attributes.captioned_targets(paths[HELD_OUT_ROWS], captions[HELD_OUT_ROWS])
  r = attributes.attribute_accuracy(paths, targets)
  assert r.num_images == len(paths) > 140
  assert r.detection_rate >= 0.85, r.summary()
  # Measured 0.518 (chance 0.223); 0.530 on the whole held-out half (benchmarks/RESULTS.md).
  assert r.accuracy >= max(0.40, r.chance + 0.15), r.summary()
  assert r.balanced_accuracy >= 0.35, r.summary()


def test_cli(tmp_path, capsys):
  source = shared_path('data', 'anime_faces_mlds96_tagged')
  paths, captions = attributes.read_captions(source)
  folder = tmp_path / 'samples'
  folder.mkdir()
  rows = list(zip(paths, captions))[HELD_OUT_ROWS][:20]
  for path, _ in rows:
    shutil.copy(path, folder / path.name)
  (folder / 'captions.tsv').write_text(
      'file\tcaption\n' + ''.join(f'{p.name}\t{c}\n' for p, c in rows))
  expected = sum(attributes.hair_colour_from_caption(c) is not None for _, c in rows)
  out_csv = tmp_path / 'out' / 'hair.csv'
  assert cli.main(['-q', 'attributes', str(folder), '--csv', str(out_csv)]) == 0
  out = capsys.readouterr().out
  assert out.startswith('Hair-colour accuracy: ') and 'Chance level: ' in out
  assert f'/{expected} images; {20 - expected} of 20 captions name no single' in out
  with open(out_csv) as f:
    assert len(list(csv.DictReader(f))) == expected

  # --captions elsewhere, and the error path: exit code 2 and a message, no traceback.
  table = tmp_path / 'elsewhere.tsv'
  shutil.move(folder / 'captions.tsv', table)
  assert cli.main(['-q', 'attributes', str(folder)]) == 2
  assert 'captions.tsv not found' in capsys.readouterr().err
  assert cli.main(['-q', 'attributes', str(folder), '--captions', str(table),
                   '--max-images', '5']) == 0
  assert 'of 5 captions' in capsys.readouterr().out
  table.write_text('file\tcaption\n' + ''.join(f'{p.name}\tblue eyes\n' for p, _ in rows))
  assert cli.main(['-q', 'attributes', str(folder), '--captions', str(table)]) == 2
  assert 'names a single hair colour' in capsys.readouterr().err
  assert cli.main(['-q', 'attributes', str(tmp_path / 'missing')]) == 2
