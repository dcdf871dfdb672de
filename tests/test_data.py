"""Tests for data/: tokenizer, the mm_shapes builder and the Grain pipelines."""

import collections
import json
import os
import subprocess
import sys
import time

from absl import flags
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data import pipeline
from data import shapes
from data import tokenizer as tok

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ('tokens', 'targets', 'modality', 'target_modality', 'loss_mask')


def test_prepare_is_safe_when_processes_race(tmp_path):
  """Two processes call prepare() at the same instant on one fresh directory.

  Uses a 50/20-example variant (SPLITS overridden in the children) to stay
  fast; `data_dir` from conftest.py is the full dataset, prepared once.
  """
  path, start = str(tmp_path), time.time() + 5  # both imported by then
  code = ('import time; from data import shapes; '
          "shapes.SPLITS = {'train': (50, 0), 'test': (20, 1)}; "
          f'time.sleep(max(0, {start} - time.time())); '
          f'b = shapes.prepare({path!r}); '
          "print('examples', len(b.as_data_source('train')))")
  env = dict(os.environ, PYTHONPATH=REPO)
  procs = [subprocess.Popen([sys.executable, '-c', code], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for _ in range(2)]
  logs = [p.communicate(timeout=120)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  assert sum(log.count('Downloading and preparing') for log in logs) == 1, logs
  assert all('examples 50' in log for log in logs), logs
  assert not [f for f in os.listdir(os.path.join(path, 'mm_shapes'))
              if f.startswith('incomplete')]


def make_cfg(data_dir, **overrides):
  cfg = ml_collections.ConfigDict(dict(
      tfds_name='mm_shapes', data_dir=data_dir, train_split='train',
      eval_split='test', text_key='caption', image_key='image',
      label_key='label', image_size=32, patch_size=4, order='both',
      num_workers=0))
  cfg.update(overrides)
  return cfg


def take(it, n):
  return [next(it) for _ in range(n)]


def check_batch(batch, rows, seq_len):
  assert set(batch) == set(KEYS)
  for k in KEYS:
    assert batch[k].shape == (rows, seq_len), k
    assert batch[k].dtype == (np.float32 if k == 'loss_mask' else np.int32), k
  t, y = batch['tokens'], batch['targets']
  np.testing.assert_array_equal(t[:, 1:], y[:, :-1])
  is_image = lambda a: (a >= tok.IMAGE_OFFSET) & (
      a < tok.IMAGE_OFFSET + tok.NUM_IMAGE_CODES)
  np.testing.assert_array_equal(batch['modality'], is_image(t))
  np.testing.assert_array_equal(batch['target_modality'], is_image(y))
  np.testing.assert_array_equal(batch['loss_mask'], y != tok.PAD)
  assert ((t >= 0) & (t < tok.VOCAB_SIZE)).all()


# ---------------------------------------------------------------------------
# Tokenizer.


def test_vocabulary_and_text_round_trip():
  assert tok.TEXT_OFFSET + 256 == tok.IMAGE_OFFSET
  assert tok.IMAGE_OFFSET + tok.NUM_IMAGE_CODES <= tok.VOCAB_SIZE
  assert tok.VOCAB_SIZE % 128 == 0
  assert tok.MODALITIES[tok.TEXT] == 'text' and tok.MODALITIES[tok.IMAGE] == 'image'
  s = 'a small red ring, ünïcödé 世界!'
  t = tok.encode_text(s)
  assert t.dtype == np.int32 and len(t) == len(s.encode())
  assert t.min() >= tok.TEXT_OFFSET and t.max() < tok.IMAGE_OFFSET
  assert tok.decode_text(t) == s
  mixed = np.concatenate([[tok.BOS], t[:5], [tok.BOI, 300, tok.EOI], t[5:],
                          [tok.EOS, tok.PAD]])
  assert tok.decode_text(mixed) == s


def test_palette_codebook_codes_colour_and_covered_quadrants():
  for codebook, codes, vocab in (('rgb64', 64, 384), ('palette', 192, 512)):
    assert tok.num_image_codes(codebook) == codes and tok.vocab_size(codebook) == vocab
    assert tok.IMAGE_OFFSET + codes <= vocab and vocab % 128 == 0
  img = np.zeros((8, 8, 3), np.uint8)
  img[2:6, 0:3] = tok.PALETTE['orange']  # patch 0: bottom quadrants; patch 2: top ones
  img[0:2, 4:8] = (250, 120, 10)  # near orange: the nearest palette colour counts
  img[5, 5] = tok.PALETTE['blue']  # one pixel of a 2 x 2 quadrant: under half, not ON
  orange = list(tok.PALETTE).index('orange')
  codes = tok.encode_image(img, 8, 4, 'palette') - tok.IMAGE_OFFSET
  np.testing.assert_array_equal(codes, [16 * orange + 4 + 8, 16 * orange + 1 + 2,
                                        16 * orange + 1 + 2, 0])
  assert (tok.modality_of(codes + tok.IMAGE_OFFSET) == tok.IMAGE).all()
  with pytest.raises(ValueError, match='even patch_size'):
    tok.encode_image(np.zeros((9, 9, 3), np.uint8), 9, 3, 'palette')
  with pytest.raises(ValueError, match='is not one of'):
    tok.encode_image(img, 8, 4, 'vq')


@pytest.mark.parametrize('pixel, code', [
    ((255, 0, 0), 48), ((0, 255, 0), 12), ((0, 0, 255), 3), ((0, 0, 0), 0),
    ((255, 255, 255), 63), ((255, 170, 0), 56), ((128, 128, 128), 42),
    ((42, 43, 127), 0 * 16 + 1 * 4 + 1)])
def test_solid_colour_code(pixel, code):
  img = np.broadcast_to(np.array(pixel, np.uint8), (32, 32, 3))
  t = tok.encode_image(img, 32, 4)
  np.testing.assert_array_equal(t, np.full(64, tok.IMAGE_OFFSET + code))
  small = np.broadcast_to(np.array(pixel, np.uint8), (16, 16, 3))  # resized
  np.testing.assert_array_equal(tok.encode_image(small, 32, 8), t[:16])


def test_grayscale_and_patch_mean():
  gray = np.zeros((8, 8), np.uint8)
  gray[:, :2] = 255  # left patch half white: mean 127.5 -> level 2 (half up)
  for img in (gray, gray[..., None]):
    codes = tok.encode_image(img, 8, 4) - tok.IMAGE_OFFSET
    np.testing.assert_array_equal(codes, [42, 0, 42, 0])


def test_decode_of_encode_is_the_downsampled_image():
  for i in range(10):
    img = shapes.generate_example('test', i)['image']
    coarse = tok.decode_image(tok.encode_image(img, 32, 4), grid=8)
    means = img.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3))
    assert np.abs(coarse - means).max() <= 42.5 + 1e-6  # half a level step
    big = tok.decode_image(tok.encode_image(img, 32, 4), grid=8, patch_size=4)
    assert big.shape == (32, 32, 3) and big.dtype == np.uint8
    np.testing.assert_array_equal(big[::4, ::4], coarse)


def test_build_sequence_and_to_example():
  text, image = tok.encode_text('ab'), np.array([270, 280], np.int32)
  a, b = text
  assert tok.build_sequence(text, image, False).tolist() == [
      tok.BOS, a, b, tok.BOI, 270, 280, tok.EOI, tok.EOS]
  assert tok.build_sequence(text, image, True).tolist() == [
      tok.BOS, tok.BOI, 270, 280, tok.EOI, a, b, tok.EOS]
  assert tok.build_sequence(text, None, 1).tolist() == [tok.BOS, a, b, tok.EOS]
  assert tok.build_sequence(None, image, False).tolist() == [
      tok.BOS, tok.BOI, 270, 280, tok.EOI, tok.EOS]

  seq = [tok.BOS, a, tok.BOI, 270, tok.EOI, tok.EOS]
  ex = tok.to_example(seq, 8)
  assert ex['tokens'].tolist() == [1, a, 3, 270, 4, 2, 0, 0]
  assert ex['targets'].tolist() == [a, 3, 270, 4, 2, 0, 0, 0]
  assert ex['modality'].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
  assert ex['target_modality'].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
  assert ex['loss_mask'].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
  short = tok.to_example(seq, 3)  # truncated to 4 tokens
  assert short['tokens'].tolist() == [1, a, 3]
  assert short['targets'].tolist() == [a, 3, 270]
  assert short['loss_mask'].tolist() == [1, 1, 1]
  check_batch({k: v[None] for k, v in ex.items()}, 1, 8)


# ---------------------------------------------------------------------------
# The mm_shapes builder.


def test_builder_round_trip(data_dir):
  builder = shapes.prepare(data_dir)  # already there: just opens it
  assert builder.name == 'mm_shapes' and builder.is_prepared()
  assert {s: builder.info.splits[s].num_examples for s in shapes.SPLITS} == {
      s: n for s, (n, _) in shapes.SPLITS.items()}
  label_names = builder.info.features['label'].names
  for split, indices in (('train', [0, 1, 2, 19_999]), ('test', range(30))):
    source = builder.as_data_source(split)
    for i in indices:
      want, got = shapes.generate_example(split, i), source[i]
      np.testing.assert_array_equal(got['image'], want['image'])
      assert got['caption'].decode() == want['caption']
      for k in ('label', 'color', 'size', 'position', 'num_shapes'):
        assert int(got[k]) == int(want[k]), k
      assert label_names[got['label']] in want['caption']


def test_captions_describe_images():
  codes = tok.quantise_rgb(list(shapes.COLORS.values()))
  assert len(set(codes.tolist())) == len(shapes.COLORS)  # distinct as tokens
  seen, areas = collections.Counter(), collections.defaultdict(list)
  for i in range(300):
    ex = shapes.generate_example('test', i)
    kind, color = shapes.KINDS[ex['label']], list(shapes.COLORS)[ex['color']]
    size, pos = list(shapes.SIZES)[ex['size']], shapes.POSITIONS[ex['position']]
    first = ex['caption'].split(' and ')[0]
    for word in (kind, color, size, pos):
      assert word in first, (word, first)
    seen[ex['num_shapes']] += 1
    if ex['num_shapes'] > 1:
      continue
    ys, xs = np.nonzero(ex['image'].any(-1))
    cell = np.rint((np.array([ys.mean(), xs.mean()]) + 0.5 - 8) / 8)
    assert cell.tolist() == list(divmod(ex['position'], 3)), first
    areas[size].append(len(ys))
    codes = tok.encode_image(ex['image'], 32, 4) - tok.IMAGE_OFFSET
    codes = codes[codes > 0]  # patches touched by the shape
    levels = np.stack([codes // 16, codes // 4 % 4, codes % 4], -1)
    assert len(codes) and (levels[:, np.array(shapes.COLORS[color]) == 0]
                           == 0).all(), first
  assert max(areas['small']) < min(areas['large'])
  assert seen[1] > 250 and seen[2] > 5


def test_captions_determine_images(data_dir):
  """Held-out H(image code | kind, colour, size, position, patch) << H(code)."""
  builder = shapes.prepare(data_dir)
  attrs = lambda r: (r['label'], r['color'], r['size'], r['position'])
  counts = collections.defaultdict(lambda: np.zeros((64, 64)))
  train = builder.as_data_source('train')
  for i in range(10_000):
    r = train[i]
    if r['num_shapes'] == 1:
      codes = tok.encode_image(r['image'], 32, 4) - tok.IMAGE_OFFSET
      counts[attrs(r)][np.arange(64), codes] += 1
  unigram, nll = np.zeros(64), []
  test = builder.as_data_source('test')
  for i in range(len(test)):
    r = test[i]
    if r['num_shapes'] == 1:
      codes = tok.encode_image(r['image'], 32, 4) - tok.IMAGE_OFFSET
      np.add.at(unigram, codes, 1)
      c = counts[attrs(r)]
      p = (c[np.arange(64), codes] + 0.01) / (c.sum(1) + 0.64)
      nll.extend(-np.log(p))
  p = unigram[unigram > 0] / unigram.sum()
  h_unigram, h_cond = -(p * np.log(p)).sum(), np.mean(nll)
  assert h_unigram > 0.5, h_unigram
  assert h_cond < 0.4 * h_unigram, (h_cond, h_unigram)


# ---------------------------------------------------------------------------
# Pipelines on mm_shapes.


def test_train_batches(data_dir):
  it = pipeline.make_train_iterator(make_cfg(data_dir), seq_len=128,
                                    global_batch_size=32, seed=0)
  image_first = []
  for batch in take(it, 3):
    check_batch(batch, 32, 128)
    t = batch['tokens']
    assert (t[:, 0] == tok.BOS).all()
    image_first.extend(t[:, 1] == tok.BOI)
    assert ((t == tok.BOI).sum(1) == 1).all()
    n_image = batch['modality'].sum(1)
    assert (n_image[t[:, 1] == tok.BOI] == 64).all()
    assert (n_image >= 16).all()  # long 2-shape captions may cut the image
  assert 0.2 < np.mean(image_first) < 0.8  # both orders occur
  for order, first in (('text_first', False), ('image_first', True)):
    batch = next(pipeline.make_train_iterator(
        make_cfg(data_dir, order=order), seq_len=128, global_batch_size=8,
        seed=0))
    assert ((batch['tokens'][:, 1] == tok.BOI) == first).all()


def test_train_is_deterministic_and_resumes(data_dir):
  kw = dict(seq_len=96, global_batch_size=16, seed=5)
  it = pipeline.make_train_iterator(make_cfg(data_dir), **kw)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  rest = take(it, 3)
  fresh = pipeline.make_train_iterator(make_cfg(data_dir), **kw)
  fresh.set_state(state)
  again = pipeline.make_train_iterator(make_cfg(data_dir), **kw)
  first = take(again, 6)
  other = next(pipeline.make_train_iterator(make_cfg(data_dir), **kw | {'seed': 6}))
  for a, b, c in zip(rest, take(fresh, 3), first[3:]):
    for k in KEYS:
      np.testing.assert_array_equal(a[k], b[k])
      np.testing.assert_array_equal(a[k], c[k])
  assert not np.array_equal(first[0]['tokens'], other['tokens'])


def test_worker_processes_give_the_same_batches(data_dir):
  flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
  kw = dict(seq_len=64, global_batch_size=8, seed=3)
  local = take(pipeline.make_train_iterator(make_cfg(data_dir), **kw), 3)
  it = pipeline.make_train_iterator(make_cfg(data_dir, num_workers=1), **kw)
  for a, b in zip(local, take(it, 3)):
    np.testing.assert_array_equal(a['tokens'], b['tokens'])
  json.dumps(it.get_state())


def rows(batches):
  out = collections.Counter()
  for b in batches:
    out.update(tuple(r) for r, m in zip(b['tokens'], b['loss_mask']) if m.any())
  return out


def test_process_rows_make_the_one_process_global_batches(data_dir):
  """Each process reads its own rows; stacked, they are the 1-process global batches (so
  losses and the data order do not depend on the process count), and over an epoch the
  processes' records are disjoint and cover the split."""
  cfg = make_cfg(data_dir, train_split='test[:40]')
  kw = dict(seq_len=64, global_batch_size=10, seed=1)
  whole = take(pipeline.make_train_iterator(cfg, **kw), 8)
  parts = [take(pipeline.make_train_iterator(cfg, **kw, process_index=p, process_count=2),
                8) for p in range(2)]
  for k, batch in enumerate(whole):
    check_batch(parts[0][k], 5, 64)
    for key in KEYS:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][k][key], parts[1][k][key]]), batch[key])
  # The iterator state counts global batches: a 2-process position resumes on 1 process.
  it = pipeline.make_train_iterator(cfg, **kw, process_index=1, process_count=2)
  take(it, 3)
  single = pipeline.make_train_iterator(cfg, **kw)
  single.set_state(json.loads(json.dumps(it.get_state())))
  np.testing.assert_array_equal(next(single)['tokens'], whole[3]['tokens'])
  per_process = [rows(p[:4]) for p in parts]  # the first epoch: 4 global batches
  assert not set(per_process[0]) & set(per_process[1])
  assert per_process[0] + per_process[1] == rows(whole[:4])
  assert len(rows(whole[:4])) == 40


def test_reshuffles_each_epoch(data_dir):
  cfg = make_cfg(data_dir, train_split='test[:40]', order='text_first')
  it = pipeline.make_train_iterator(cfg, seq_len=64, global_batch_size=40,
                                    seed=2)
  e1, e2 = next(it)['tokens'], next(it)['tokens']
  assert collections.Counter(map(tuple, e1)) == collections.Counter(
      map(tuple, e2))
  assert not np.array_equal(e1, e2)


def test_eval_iterator(data_dir):
  cfg = make_cfg(data_dir)
  ds = pipeline.make_eval_iterator(cfg, seq_len=128, batch_size=4, num_examples=10)
  batches = list(ds)
  assert len(batches) == 3
  for b in batches:
    check_batch(b, 4, 128)
  last = batches[-1]  # 2 records + 2 all-PAD rows
  assert (last['tokens'][2:] == tok.PAD).all() and last['loss_mask'][:2].any(1).all()
  flat = np.concatenate([b['tokens'] for b in batches])[:10]
  assert (flat[1::2, 1] == tok.BOI).all() and (flat[0::2, 1] != tok.BOI).all()
  for a, b in zip(batches, ds):  # re-iterable, fixed order
    np.testing.assert_array_equal(a['tokens'], b['tokens'])
  first = shapes.generate_example('test', 0)['caption']
  assert tok.decode_text(flat[0]) == first

  shards = [list(pipeline.make_eval_iterator(
      cfg, seq_len=128, batch_size=4, num_examples=9, process_index=p,
      process_count=2)) for p in range(2)]
  assert [len(s) for s in shards] == [3, 3]  # 5 and 4 records, padded to 6
  check_batch(shards[1][-1], 2, 128)
  nine = pipeline.make_eval_iterator(cfg, seq_len=128, batch_size=3,
                                     num_examples=9)
  assert rows(shards[0]) + rows(shards[1]) == rows(nine)
  assert not set(rows(shards[0])) & set(rows(shards[1]))


# ---------------------------------------------------------------------------
# Any TFDS dataset: mocked mnist (image + label) and imdb_reviews (text).


def test_mock_mnist_image_with_label_caption(tmp_path):
  cfg = make_cfg(str(tmp_path), tfds_name='mnist', text_key='')
  with tfds.testing.mock_data(num_examples=12):
    batch = next(pipeline.make_train_iterator(
        cfg, seq_len=80, global_batch_size=6, seed=0))
    evals = list(pipeline.make_eval_iterator(cfg, seq_len=80, batch_size=5))
  check_batch(batch, 6, 80)
  assert (batch['modality'].sum(1) == 64).all()
  for row in batch['tokens']:
    assert tok.decode_text(row) in [str(d) for d in range(10)]
  assert len(evals) == 3 and (evals[-1]['loss_mask'][2:] == 0).all()
  for b in evals:
    check_batch(b, 5, 80)


def test_mock_imdb_text_only(tmp_path):
  cfg = make_cfg(str(tmp_path), tfds_name='imdb_reviews', text_key='text',
                 image_key='')
  with tfds.testing.mock_data(num_examples=8):
    batch = next(pipeline.make_train_iterator(
        cfg, seq_len=8, global_batch_size=4, seed=0))
    evals = list(pipeline.make_eval_iterator(cfg, seq_len=8, batch_size=4))
  check_batch(batch, 4, 8)
  assert (batch['modality'] == tok.TEXT).all()
  assert not np.isin(batch['tokens'], [tok.BOI, tok.EOI]).any()
  assert len(evals) == 2
  for b in evals:
    check_batch(b, 4, 8)
    assert b['loss_mask'].all()  # mock reviews have at least 10 bytes


# ---------------------------------------------------------------------------
# Bad configs.


@pytest.mark.parametrize('overrides, match', [
    (dict(tfds_name='no_such_dataset_xyz'), 'unknown TFDS dataset'),
    (dict(train_split='validation'), "no split 'validation'"),
    (dict(image_size=30), 'multiple of data.patch_size'),
    (dict(text_key='', image_key=''), 'text_key or data.image_key'),
    (dict(text_key='description'), "text_key='description' is not a feature"),
    (dict(image_key='label'), "image_key='label' .* is a ClassLabel, not an"),
    (dict(order='random'), "order='random'"),
    (dict(num_workers=-1), 'num_workers'),
    (dict(text_key='', label_key='size2'), "label_key='size2' is not a "),
])
def test_bad_configs(data_dir, overrides, match):
  with pytest.raises(ValueError, match=match):
    pipeline.make_train_iterator(make_cfg(data_dir, **overrides), seq_len=32,
                                 global_batch_size=2, seed=0)


def test_missing_key_and_unprepared_dataset(data_dir, tmp_path):
  cfg = make_cfg(data_dir)
  del cfg['eval_split']
  with pytest.raises(ValueError, match=r"missing keys \['eval_split'\]"):
    pipeline.make_eval_iterator(cfg, seq_len=32, batch_size=2)
  cfg = make_cfg(str(tmp_path), tfds_name='mnist', text_key='')
  with pytest.raises(ValueError, match="'mnist' is not prepared under"):
    pipeline.make_eval_iterator(cfg, seq_len=32, batch_size=2)
