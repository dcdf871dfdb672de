"""mm_scenes (data/scenes.py): deterministic examples, a resumable fresh training stream
split across processes like the TFDS pipeline's, tokens that decode to the rendered image up
to the 'palette' codebook, its variants, and the caption grammar."""

import json
import re

import ml_collections
import numpy as np
import pytest

from configs import common, dense
from data import pipeline, scenes
from data import tokenizer as tok


def _cfg(name='mm_scenes', **overrides):
  c = dense.get_config('tiny,data=scenes').data
  c.tfds_name = name
  c.image_size = scenes.parse_name(name).image_size
  c.update(overrides)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_examples_are_deterministic_and_the_splits_differ():
  a, b = scenes.generate_example('train', 12), scenes.generate_example('train', 12)
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['caption'] == b['caption']
  source = scenes.Source(scenes.ScenesSpec(), 'test')
  assert len(source) == 10_000
  assert source[12]['caption'] == scenes.generate_example('test', 12)['caption']
  train = [scenes.generate_example('train', i)['caption'] for i in range(50)]
  test = [scenes.generate_example('test', i)['caption'] for i in range(50)]
  assert train != test and len(set(train)) > 45
  with pytest.raises(IndexError):
    scenes.generate_example('test', 10_000)


def test_train_stream_is_the_examples_in_order_and_resumes():
  cfg = _cfg(order='text_first')
  kw = dict(seq_len=224, global_batch_size=4, seed=0)
  it = pipeline.make_train_iterator(cfg, **kw)
  first = _take(it, 2)
  for k in range(8):  # row k of the stream is example k: fresh data, no shuffle or epochs
    ex = scenes.generate_example('train', k)
    seq = tok.build_sequence(tok.encode_text(ex['caption']),
                             tok.encode_image(ex['image'], 36, 4, 'palette'), False)
    np.testing.assert_array_equal(first[k // 4]['tokens'][k % 4], tok.to_example(
        seq, 224)['tokens'])
  state = json.loads(json.dumps(it.get_state()))
  rest = _take(it, 2)
  fresh = pipeline.make_train_iterator(cfg, **kw)
  fresh.set_state(state)
  for a, b in zip(rest, _take(fresh, 2)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_process_rows_make_the_one_process_global_batches():
  cfg = _cfg()
  kw = dict(seq_len=224, global_batch_size=6, seed=1)
  whole = _take(pipeline.make_train_iterator(cfg, **kw), 3)
  parts = [_take(pipeline.make_train_iterator(cfg, **kw, process_index=p, process_count=2),
                 3) for p in range(2)]
  for k, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][k][key], parts[1][k][key]]), batch[key])
  assert 0 < np.mean([b['tokens'][:, 1] == tok.BOI for b in whole]) < 1  # both orders


def test_tokens_decode_to_the_rendered_image_up_to_the_codebook():
  for i in range(20):
    image = scenes.generate_example('test', i)['image']
    decoded = tok.decode_image(tok.encode_image(image, 36, 4, 'palette'), 9, 4, 'palette')
    on = image.max(-1) >= tok.ON_LEVEL  # quadrants (2 x 2 px) drawn iff half their pixels are on
    quad_on = on.reshape(18, 2, 18, 2).sum(axis=(1, 3)) >= 2
    quad_rgb = image.reshape(18, 2, 18, 2, 3).max(axis=(1, 3))  # objects are flat colours
    want = np.where(quad_on[..., None], quad_rgb, 0)
    np.testing.assert_array_equal(decoded, np.repeat(np.repeat(want, 2, 0), 2, 1))


def test_variants_build_and_sequences_fit():
  for name, grid, kinds in (('mm_scenes', 3, 32), ('mm_scenes/g2_k8', 2, 8),
                            ('mm_scenes/g4_k512', 4, 512)):
    spec = scenes.parse_name(name)
    assert (spec.grid, spec.kinds, spec.image_size) == (grid, kinds, 12 * grid)
    names, bitmaps = scenes.kinds(kinds)
    assert len(set(names)) == kinds == len(bitmaps)
    assert not set(names[6:]) & set(scenes._caption_words())
    longest = max(len(tok.build_sequence(
        tok.encode_text(scenes.generate_example('train', i, spec)['caption']),
        np.zeros((3 * grid) ** 2, np.int32), False)) for i in range(300))
    assert longest <= scenes.max_sequence_length(spec)
    config = dense.get_config(f'tiny,data={name.replace("mm_", "")}')
    assert config.seq_len + 1 >= scenes.max_sequence_length(spec)
    assert config.data.tfds_name == name and config.model.vocab_size == 512
  model = scenes.FloorModel(scenes.parse_name('mm_scenes/g2_k8'), 4, 'palette')
  assert model.num_patches == 36 and len(model.table.probs) == 8 * 12 * 3 * 9
  for bad in ('mm_scenes/g9_k8', 'mm_scenes/k8', 'mm_scenes/g3_k2'):
    with pytest.raises(ValueError, match='mm_scenes variants'):
      scenes.parse_name(bad)
  with pytest.raises(ValueError, match='data='):
    common.dataset('shapes/g3')


def test_shapes_seq_len_fits_its_longest_sequence():
  from data import shapes
  longest = max(len(shapes.describe(t, (k, c, s, p))) for t in shapes.TEMPLATES
                for k in range(6) for c in range(8) for s in range(2) for p in range(9))
  second = max(len(shapes.describe(shapes.SECOND, (k, c, s, p))) for k in range(6)
               for c in range(8) for s in range(2) for p in range(9) if p != 4)
  assert longest + second + 64 + 4 == common.SHAPES_MAX_LEN
  assert dense.get_config('tiny').seq_len + 1 >= common.SHAPES_MAX_LEN


def test_captions_follow_the_grammar():
  spec = scenes.ScenesSpec()
  names = scenes.kinds(spec.kinds)[0]
  word = '|'.join(names)
  place = '|'.join(scenes.cell_names(3)) + '|(left of|right of|above|below) (' + word + ')'
  phrase = (f'(({"|".join(spec.colors)}) )?(({"|".join(scenes.FILLS)}) )?({word}) '
            f'({place})')
  pattern = re.compile(f'((one|two|three): )?{phrase}(, {phrase})*')
  counts = []
  for i in range(300):
    caption = scenes.generate_example('train', i)['caption']
    assert pattern.fullmatch(caption), caption
    counts.append(caption.count(', ') + 1)
    m = re.match(r'(one|two|three): ', caption)
    if m:
      assert scenes.COUNT_WORDS.index(m[1]) + 1 == counts[-1], caption
  assert set(counts) == {1, 2, 3}


def test_bad_scenes_configs_are_one_line_errors():
  for overrides, match in (({'text_key': 'text'}, "text_key='text' is not a feature"),
                           ({'text_key': '', 'label_key': 'label'}, 'has no labels'),
                           ({'eval_split': 'validation'}, "no split|splits")):
    cfg = _cfg(**overrides)
    with pytest.raises(ValueError, match=match):
      pipeline.data_source(cfg, 'eval_split')
  bad = ml_collections.ConfigDict(dict(_cfg()))
  bad.tfds_name = 'mm_scenes/g3'
  with pytest.raises(ValueError, match='mm_scenes variants'):
    pipeline.data_source(bad, 'train_split')
