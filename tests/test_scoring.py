"""Exact sample scores (data/scoring.py) on hand-made generations whose truth is known by
construction: for mm_shapes and mm_scenes, in both directions, an example's own image for
its caption (and own caption for its image) is consistent; the same objects in another
colour or place, said or drawn, are not; a truncated image or a caption without EOS scores
False; a prompt the generator cannot produce raises ValueError. What the generator leaves
open stays consistent: a colour the caption does not say, a kind whose tokens another kind's
rendering shares (checked against rendering every jitter)."""

import dataclasses
import functools
import itertools

import numpy as np
import pytest

from data import floor, scenes, scoring, shapes
from data import tokenizer as tok

RGB = ('red', 'green', 'blue')  # no channel in common: a swap shows in every covered patch
NUM_CASES = 4


@functools.cache
def _shapes_cases():
  """mm_shapes test examples whose first shape is red, green or blue: (caption, codes) and,
  per kind of change, (caption, codes, changed caption, changed codes)."""
  model = shapes.FloorModel(shapes.SPEC, 4, 'rgb64')
  encode = lambda image: tok.encode_images(image[None], 4, 'rgb64')[0]  # noqa: E731
  colors = list(shapes.SPEC.colors)
  cases = {'right': [], 'colour': [], 'position': []}
  two_shapes = 0
  for i in range(400):
    rng = np.random.default_rng((shapes.SPLITS['test'][1], i))
    objects, jitters, template = shapes.draw_scene(floor.Sampler(rng))
    example = shapes.generate_example('test', i)
    caption = example['caption'].encode()
    assert shapes.caption_of(objects, template).encode() == caption  # the replay is example i
    codes = encode(example['image'])
    (kind, color, size, pos), rest = objects[0], objects[1:]
    if colors[color] not in RGB or (rest and two_shapes):
      continue
    two_shapes += bool(rest)
    other = colors.index(RGB[(RGB.index(colors[color]) + 1) % 3])
    changes = {'colour': [(kind, other, size, pos)] + rest}
    if not rest:
      changes['position'] = [(kind, color, size, 8 - pos if pos != 4 else 0)]
    cases['right'].append((caption, codes))
    for name, changed in changes.items():
      cases[name].append((caption, codes, shapes.caption_of(changed, template).encode(),
                          encode(shapes.render(changed, jitters))))
    if two_shapes and min(map(len, cases.values())) >= NUM_CASES:
      return model, cases
  raise AssertionError('too few examples')


@functools.cache
def _scenes_cases():
  """mm_scenes test examples, changed in their first object (always placed absolutely);
  'colour' where the caption says its colour, 'unsaid' (a recoloured image) where not;
  'position' where no place is said relative to another object."""
  spec = scenes.ScenesSpec()
  model = scenes.FloorModel(spec, 4, 'palette')
  encode = lambda image: tok.encode_images(image[None], 4, 'palette')[0]  # noqa: E731
  cells = [c.encode() for c in scenes.cell_names(spec.grid)]
  cases = {'right': [], 'colour': [], 'position': [], 'unsaid': []}
  for i in range(400):
    ch = floor.Sampler(np.random.default_rng((scenes.SPLITS['test'][1], i)))
    objects = scenes.draw_scene(ch, spec)
    example = scenes.generate_example('test', i, spec)
    caption = example['caption'].encode()
    assert ch.text == caption  # the replay is example i
    codes = encode(example['image'])
    first, rest = objects[0], objects[1:]
    count, phrases = b'', caption.split(b', ')
    if b': ' in phrases[0]:
      count, phrases[0] = phrases[0].split(b': ')
      count += b': '
    assert phrases[0].endswith(b' ' + cells[first.cell])
    word = spec.colors[first.color].encode() + b' '
    other = (first.color + 1) % len(spec.colors)
    recoloured = encode(scenes.render([dataclasses.replace(first, color=other)] + rest, spec))
    said = phrases[0].startswith(word)
    if not said and len(cases['unsaid']) < NUM_CASES:
      cases['unsaid'].append((caption, recoloured))
    if said and len(cases['right']) < NUM_CASES:
      cases['right'].append((caption, codes))
      said_other = spec.colors[other].encode() + b' ' + phrases[0][len(word):]
      cases['colour'].append((caption, codes, b', '.join([count + said_other] + phrases[1:]),
                              recoloured))
    relative = any(r.encode() in p for r in scenes.RELATIONS for p in phrases[1:])
    if not relative and len(cases['position']) < NUM_CASES:  # the moved caption holds
      free = min(set(range(spec.grid ** 2)) - {o.cell for o in objects})
      moved = phrases[0][:-len(cells[first.cell])] + cells[free]
      cases['position'].append((
          caption, codes, b', '.join([count + moved] + phrases[1:]),
          encode(scenes.render([dataclasses.replace(first, cell=free)] + rest, spec))))
    if min(map(len, cases.values())) >= NUM_CASES:
      return model, cases
  raise AssertionError('too few examples')


@pytest.fixture(scope='module', params=['shapes', 'scenes'])
def dataset(request):
  return (_shapes_cases if request.param == 'shapes' else _scenes_cases)()


def _text_first(caption, generation):
  return np.concatenate([[tok.BOS], tok.encode_bytes(caption), [tok.BOI], generation])


def _image_first(codes, generation):
  return np.concatenate([[tok.BOS, tok.BOI], codes + tok.IMAGE_OFFSET, [tok.EOI], generation])


def _pad(seq, extra=5):
  return np.concatenate([seq, np.full(extra, tok.PAD)]).astype(np.int32)


def test_an_examples_own_image_and_caption_are_consistent(dataset):
  model, cases = dataset
  for caption, codes in cases['right']:
    assert scoring.image_consistent(caption, codes, model)
    assert scoring.caption_consistent(codes, caption, model)
    image = np.concatenate([codes + tok.IMAGE_OFFSET, [tok.EOI, tok.EOS]])
    assert scoring.score_sequence(_pad(_text_first(caption, image)), model) == (
        'text_to_image', True)
    text = np.concatenate([tok.encode_bytes(caption), [tok.EOS]])
    assert scoring.score_sequence(_pad(_image_first(codes, text)), model) == (
        'image_to_caption', True)


@pytest.mark.parametrize('change', ['colour', 'position'])
def test_another_colour_or_place_is_inconsistent(dataset, change):
  model, cases = dataset
  for caption, codes, changed_caption, changed_codes in cases[change]:
    assert changed_caption != caption and (changed_codes != codes).any()
    assert not scoring.image_consistent(caption, changed_codes, model)
    assert not scoring.caption_consistent(codes, changed_caption, model)
    # ... while each change is consistent with its own changed counterpart
    assert scoring.image_consistent(changed_caption, changed_codes, model)


def test_an_unsaid_colour_is_free():
  model, cases = _scenes_cases()
  for caption, recoloured in cases['unsaid']:
    assert scoring.image_consistent(caption, recoloured, model)


def test_tokens_shared_by_two_kinds_fit_both_captions():
  """A small red diamond's tokens equal a small red plus's at some jitters (mm_shapes
  docstring): the score is True exactly for the kinds some rendering of which has them."""
  model = _shapes_cases()[0]
  red, small = list(shapes.COLORS).index('red'), list(shapes.SIZES).index('small')
  encode = lambda o, j: tok.encode_images(shapes.render([o], [j])[None], 4)[0]  # noqa: E731
  jitters = list(itertools.product(range(-1, 2), repeat=2))
  codes = encode((shapes.KINDS.index('diamond'), red, small, 0), (-1, 0))
  fits = {}
  for k, kind in enumerate(shapes.KINDS):
    caption = f'a small red {kind} at the top left'.encode()
    want = any((encode((k, red, small, 0), j) == codes).all() for j in jitters)
    fits[kind] = scoring.image_consistent(caption, codes, model)
    assert fits[kind] == want, kind
  assert fits['diamond'] and fits['plus'] and not fits['square']


def test_malformed_generations_score_false(dataset):
  model, cases = dataset
  n = model.num_patches
  for caption, codes in cases['right'][:2]:
    image = codes + tok.IMAGE_OFFSET
    for bad in (np.concatenate([image[:-1], [tok.EOI, tok.EOS]]),  # one code short
                np.concatenate([image, image[:1], [tok.EOI]]),  # one code too many
                image,  # no EOI
                np.concatenate([image[:n // 2], [tok.EOS]])):
      assert scoring.score_sequence(_pad(_text_first(caption, bad)), model) == (
          'text_to_image', False)
    assert not scoring.image_consistent(caption, codes[:-1], model)
    text = tok.encode_bytes(caption)
    for bad in (text,  # no EOS
                np.concatenate([text[:-1], [tok.EOS]]),  # a byte short
                np.concatenate([text[:3], [tok.IMAGE_OFFSET + caption[3]], text[4:],
                                [tok.EOS]]),  # an image token (its byte were it text)
                np.concatenate([text, [tok.TEXT_OFFSET], text, [tok.EOS]]),  # NUL
                [tok.EOS]):
      assert scoring.score_sequence(_pad(_image_first(codes, bad)), model) == (
          'image_to_caption', False)
    for not_eoi in (tok.IMAGE_OFFSET, tok.BOS):  # a code too many; another special
      seq = np.concatenate([[tok.BOS, tok.BOI], codes + tok.IMAGE_OFFSET, [not_eoi], text,
                            [tok.EOS]])
      assert scoring.score_sequence(_pad(seq), model) == ('image_to_caption', False)


def test_a_bad_prompt_raises(dataset):
  model, cases = dataset
  n = model.num_patches
  caption, codes = cases['right'][0]
  image = np.concatenate([codes + tok.IMAGE_OFFSET, [tok.EOI, tok.EOS]])
  nonsense = caption.replace(b' ', b' zz', 1)  # a word the generator never writes
  with pytest.raises(ValueError, match='not one the generator writes'):
    scoring.image_consistent(nonsense, codes, model)
  for gen in (image, image[:3]):  # whatever the generation
    with pytest.raises(ValueError, match='not one the generator writes'):
      scoring.score_sequence(_text_first(nonsense, gen), model)
  with pytest.raises(ValueError, match='caption bytes'):
    scoring.score_sequence(np.concatenate([[tok.BOS], tok.encode_bytes(caption)]), model)
  with pytest.raises(ValueError, match='starts with BOS'):
    scoring.score_sequence(_text_first(caption, image)[1:], model)
  codebook = 'palette' if isinstance(model, scenes.FloorModel) else 'rgb64'
  side = 4 * int(round(np.sqrt(n)))
  red = np.broadcast_to(np.array([255, 0, 0], np.uint8), (1, side, side, 3))
  full = tok.encode_images(red, 4, codebook)[0]  # all red: no object fills its whole region
  text = np.concatenate([tok.encode_bytes(caption), [tok.EOS]])
  with pytest.raises(ValueError, match='not one the generator draws'):
    scoring.caption_consistent(full, caption, model)
  with pytest.raises(ValueError, match='not one the generator draws'):
    scoring.score_sequence(_image_first(full, text), model)
  with pytest.raises(ValueError, match='image codes'):
    scoring.score_sequence(np.concatenate([[tok.BOS, tok.BOI], codes[:5] + tok.IMAGE_OFFSET,
                                           [tok.EOI], text]), model)


def test_score_sequence_agrees_with_the_direct_scores(dataset):
  model, cases = dataset
  seen = set()
  for caption, codes, changed_caption, changed_codes in cases['colour'] + cases['position']:
    for c, x in ((caption, codes), (caption, changed_codes), (changed_caption, codes)):
      want = scoring.image_consistent(c, x, model)
      image = np.concatenate([x + tok.IMAGE_OFFSET, [tok.EOI, tok.EOS]])
      assert scoring.score_sequence(_text_first(c, image), model) == ('text_to_image', want)
      want2 = scoring.caption_consistent(x, c, model)
      text = np.concatenate([tok.encode_bytes(c), [tok.EOS]])
      assert scoring.score_sequence(_image_first(x, text), model) == ('image_to_caption', want2)
      seen |= {want, want2}
  assert seen == {True, False}
