"""data/import_pairs.py: the user's own (image, caption) pairs, from a folder or a JSONL
file, through data/pipeline.py as the trainers read them; pre-tokenised images
(data.image_tokens_key); the one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from configs import dense
from data import import_pairs
from data import pipeline
from data import tokenizer as tok
from tests.helpers import tiny_config
from training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ('cat', 'dog', 'fox', 'owl', 'bee', 'ant')


def _images(seed=0):
  """Six random 8x8 RGB images; the last is 16 wide, so it is centre-cropped."""
  rng = np.random.default_rng(seed)
  shapes = [(8, 8, 3)] * 5 + [(8, 16, 3)]
  return {n: rng.integers(0, 256, s, dtype=np.uint8) for n, s in zip(NAMES, shapes)}


def _folder(path, images):
  os.makedirs(path, exist_ok=True)
  for name, img in images.items():
    Image.fromarray(img).save(os.path.join(path, f'{name}.png'))
    with open(os.path.join(path, f'{name}.txt'), 'w') as f:
      f.write(f'a photo of a {name}\n')
  return str(path)


def _jsonl(path, rows):
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return str(path)


def _data_cfg(overrides):
  """configs/dense.py:tiny's data block with the printed --config.data.* overrides."""
  cfg = dense.get_config('tiny')
  for flag in overrides:
    key, value = flag[len('--config.'):].split('=', 1)
    node, leaf = (cfg.data, key[5:]) if key.startswith('data.') else (cfg, key)
    node[leaf] = type(node[leaf])(value)
  return cfg


def _sequences(cfg, seq_len=64):
  """Every row of a train batch and of the eval split as the trainers' iterators yield it,
  checked to be exactly [BOS] encode_text(caption) [BOI] image [EOI] [EOS] (or the image
  first): (caption, image ids)."""
  out = []
  train = pipeline.make_train_iterator(cfg.data, seq_len=seq_len, global_batch_size=8, seed=0)
  evals = pipeline.make_eval_iterator(cfg.data, seq_len=seq_len, batch_size=8)
  for batch in [next(train)] + list(evals):
    for tokens, targets in zip(batch['tokens'], batch['targets']):
      seq = np.concatenate([tokens[:1], targets])
      if tokens[0] == tok.PAD:
        continue
      assert seq[0] == tok.BOS and tok.EOS in seq
      is_image = tok.modality_of(seq) == tok.IMAGE
      caption = tok.decode_text(seq[(seq >= tok.TEXT_OFFSET) & ~is_image])
      want = tok.build_sequence(tok.encode_text(caption), seq[is_image], seq[1] == tok.BOI)
      np.testing.assert_array_equal(seq, np.pad(want, (0, len(seq) - len(want))))
      out.append((caption, seq[is_image]))
  return out


def test_folder_import_reads_through_the_pipeline(tmp_path):
  images = _images()
  out = import_pairs.run(_folder(tmp_path / 'pairs', images), 'my_pairs',
                         data_dir=str(tmp_path / 'tfds'), image_size=8)
  assert out['counts'] == {'train': 5, 'test': 1} and out['skipped'] == 0
  assert out['path'] == str(tmp_path / 'tfds' / 'my_pairs' / '1.0.0')
  cfg = _data_cfg(out['overrides'])
  assert cfg.data.image_size == 8 and cfg.data.tfds_name == 'my_pairs'
  expected = {f'a photo of a {n}': img[:, 4:12] if img.shape[1] == 16 else img
              for n, img in images.items()}
  seen = _sequences(cfg)
  assert len(seen) > 6  # a train batch of 8 (repeats) + the test pair
  for caption, image in seen:
    np.testing.assert_array_equal(  # the stored image: the original, centre crop of ant
        image, tok.encode_images(expected[caption][None], 4)[0] + tok.IMAGE_OFFSET)
  assert {c for c, _ in seen} == set(expected)
  # The same command again is refused; --overwrite replaces it.
  with pytest.raises(ValueError, match='exists; pass --overwrite'):
    import_pairs.run(str(tmp_path / 'pairs'), 'my_pairs', data_dir=str(tmp_path / 'tfds'))
  import_pairs.run(str(tmp_path / 'pairs'), 'my_pairs', data_dir=str(tmp_path / 'tfds'),
                   image_size=4, overwrite=True)


def test_jsonl_import_with_image_tokens(tmp_path):
  images = _images(1)
  os.makedirs(tmp_path / 'img')
  rows = []
  for i, (name, img) in enumerate(images.items()):
    Image.fromarray(img).save(tmp_path / 'img' / f'{name}.png')
    rows.append({'img': f'img/{name}.png', 'text': f'the {name}', 'vq': [i * 190, i, 7]})
  src = _jsonl(tmp_path / 'rows.jsonl', rows)
  eval_src = _jsonl(tmp_path / 'eval.jsonl', rows[:2])
  out = import_pairs.run(src, 'vq_pairs', data_dir=str(tmp_path / 'tfds'), eval_src=eval_src,
                         image_size=4, image_field='img', caption_field='text',
                         image_tokens_field='vq')
  assert out['counts'] == {'train': 6, 'test': 2}
  assert '--config.data.image_vocab_size=951' in out['overrides']  # largest code 950 + 1
  cfg = _data_cfg(out['overrides'])
  assert cfg.data.image_tokens_key == 'image_tokens'
  assert cfg.model.vocab_size == tok.vocab_size('rgb64', 951) == 1280  # follows the data
  codes = {f'the {n}': np.array(r['vq']) for n, r in zip(NAMES, rows)}
  seen = _sequences(cfg)
  for caption, image in seen:  # the codes, not the stored pixels
    np.testing.assert_array_equal(image, codes[caption] + tok.IMAGE_OFFSET)
  assert max(image.max() for _, image in seen) == tok.IMAGE_OFFSET + 950 < cfg.model.vocab_size
  # Without the codes, the pixels (stored beside them, resized to 4x4) are quantised.
  cfg.data.image_tokens_key, cfg.data.image_size = '', 4
  for caption, image in _sequences(cfg):
    stored = import_pairs.load_image(str(tmp_path / 'img' / f'{caption[4:]}.png'), 4)
    np.testing.assert_array_equal(image, tok.encode_image(stored, 4, 4))


def test_out_of_range_codes_and_missing_vocab_are_refused(tmp_path):
  rows = [{'caption': f'row {i}', 'vq': [i, 5 * i]} for i in range(6)]
  out = import_pairs.run(_jsonl(tmp_path / 'rows.jsonl', rows), 'codes_only',
                         data_dir=str(tmp_path / 'tfds'), image_field='',
                         image_tokens_field='vq', eval_fraction=0.5)
  cfg = _data_cfg(out['overrides'])
  assert cfg.data.image_vocab_size == 26
  sources = {s: pipeline.data_source(cfg.data, k)[0]
             for s, k in (('train', 'train_split'), ('test', 'eval_split'))}
  captions = {s: [src[i]['caption'].decode() for i in range(len(src))]
              for s, src in sources.items()}
  split = 'train' if 'row 5' in captions['train'] else 'test'
  cfg.data.eval_split = split
  cfg.data.image_vocab_size = 0
  with pytest.raises(ValueError, match="image_tokens_key='image_tokens' needs "
                                       'data.image_vocab_size > 0'):
    pipeline.make_eval_iterator(cfg.data, seq_len=32, batch_size=8)
  cfg.data.image_vocab_size = 25  # row 5 holds code 25
  for key, message in (('caption', "image_tokens_key='caption' of 'codes_only' is a Text, "
                                   'not an integer Tensor'),
                       ('nope', "image_tokens_key='nope' is not a feature of 'codes_only'")):
    cfg.data.image_tokens_key = key
    with pytest.raises(ValueError, match=message):
      pipeline.make_eval_iterator(cfg.data, seq_len=32, batch_size=8)
  cfg.data.image_tokens_key = 'image_tokens'
  message = (rf"record {captions[split].index('row 5')} of split '{split}': "
             r"data.image_tokens_key='image_tokens': image code 25 is outside \[0, "
             r'data.image_vocab_size=25\)')
  with pytest.raises(ValueError, match=message) as err:
    list(pipeline.make_eval_iterator(cfg.data, seq_len=32, batch_size=8))
  assert '\n' not in str(err.value)  # what train.py prints (grain adds a note beside it)
  cfg.data.train_split = split
  with pytest.raises(ValueError, match=message):  # a batch of 8 holds every record
    next(pipeline.make_train_iterator(cfg.data, seq_len=32, global_batch_size=8, seed=0))


def test_bad_inputs_give_one_line_errors(tmp_path):
  images = _images()
  src = _folder(tmp_path / 'pairs', images)
  run = lambda src, **kw: import_pairs.run(src, 'x', data_dir=str(tmp_path / 'tfds'), **kw)
  cases = [
      (lambda: run(str(tmp_path / 'nope')), "--src='.*nope': no such file or folder"),
      (lambda: import_pairs.run(src, 'Bad-Name'), 'must be lower_snake_case'),
      (lambda: import_pairs.run(src, 'mnist'), 'is a registered TFDS dataset'),
      (lambda: run(src, image_size=6), '--image_size=6 must be a positive multiple of 4'),
      (lambda: run(src, eval_fraction=1.0), r'--eval_fraction=1.0 must be in \(0, 1\)'),
  ]
  os.makedirs(tmp_path / 'uncaptioned')
  Image.fromarray(images['cat']).save(tmp_path / 'uncaptioned' / 'cat.jpg')
  cases.append((lambda: run(str(tmp_path / 'uncaptioned')),
                'no pairs found in .*uncaptioned: expected images .* found 1 images and 0'))
  jsonl = _jsonl(tmp_path / 'rows.jsonl', [{'image': 'pairs/cat.png', 'caption': 'a cat'},
                                           {'image': 'pairs/dog.png', 'text': 'a dog'}])
  cases.append((lambda: run(jsonl), r"rows.jsonl line 2: no field 'caption' \(fields: "
                                    r"\['image', 'text'\]\)"))
  codes = _jsonl(tmp_path / 'codes.jsonl', [{'caption': 'a', 'vq': [1, 2]},
                                            {'caption': 'b', 'vq': [1, -2]}])
  cases += [
      (lambda: run(codes, image_field='', image_tokens_field='vq'),
       r"codes.jsonl line 2: 'vq' must be a list of integers >= 0"),
      (lambda: run(_jsonl(tmp_path / 'big.jsonl', [{'caption': 'a', 'vq': [1]},
                                                   {'caption': 'b', 'vq': [3, 9]}]),
                   image_field='', image_tokens_field='vq', image_vocab_size=5),
       r'big.jsonl line 2: image code 9 is outside \[0, --image_vocab_size=5\)'),
      (lambda: run(codes, image_field=''), "--image_field='' needs --image_tokens_field"),
  ]
  for fn, message in cases:
    with pytest.raises(ValueError, match=message) as err:
      fn()
    assert '\n' not in str(err.value)
  # An undecodable image is named; --skip_bad skips it and counts it.
  with open(os.path.join(src, 'dog.png'), 'wb') as f:
    f.write(b'not a png')
  with pytest.raises(ValueError, match=r'cannot decode image .*dog.png \(dog.txt\)') as err:
    run(src)
  assert '\n' not in str(err.value)
  out = run(src, skip_bad=True, image_size=8)
  assert out['skipped'] == 1 and sum(out['counts'].values()) == 5
  with open(os.path.join(src, 'dog.txt'), 'w') as f:
    f.write('  \n')
  os.remove(os.path.join(src, 'dog.png'))
  Image.fromarray(images['dog']).save(os.path.join(src, 'dog.png'))
  with pytest.raises(ValueError, match=r'^dog.txt: empty caption$'):
    run(src, overwrite=True)


def test_command_line_prints_the_train_command_or_one_error_line(tmp_path):
  src = _folder(tmp_path / 'pairs', _images())
  cmd = [sys.executable, '-m', 'data.import_pairs', f'--data_dir={tmp_path / "tfds"}',
         '--name=cli_pairs', '--image_size=8']
  run = lambda *a: subprocess.run(cmd + list(a), cwd=ROOT, capture_output=True, text=True,
                                  timeout=120)
  out = run(f'--src={src}')
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'wrote 5 train + 1 test pairs to' in out.stdout
  for flag in ('python train.py --config=configs/moma.py:tiny', '--config.data.tfds_name='
               'cli_pairs', f'--config.data.data_dir={tmp_path / "tfds"}',
               '--config.data.image_size=8', '--config.seq_len=32'):
    assert flag in out.stdout, out.stdout
  out = run(f'--src={tmp_path / "missing"}')
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith('import_pairs: error: --src=')


def test_two_training_steps_on_imported_image_codes(tmp_path):
  """configs/dense.py:tiny (shrunk) trains on a dataset of its own 1000 image codes: the
  model's vocabulary follows data.image_vocab_size and the codes count as image tokens."""
  rng = np.random.default_rng(0)
  rows = [{'caption': f'pair {i}', 'vq': rng.integers(0, 1000, 9).tolist()} for i in range(8)]
  out = import_pairs.run(_jsonl(tmp_path / 'rows.jsonl', rows), 'own_codes',
                         data_dir=str(tmp_path / 'tfds'), image_field='',
                         image_tokens_field='vq', image_vocab_size=1000)
  config = tiny_config(_data_cfg(out['overrides']), total_steps=2, warmup_steps=0,
                       log_every=1, checkpoint_every=2)
  assert config.model.vocab_size == 1280 and config.seq_len == 32
  scalars = loop.train(config, str(tmp_path / 'run'))
  assert np.isfinite(scalars['train/loss']) and scalars['train/loss/image'] > 0


def test_vocab_follows_image_vocab_size_and_embedded_datasets_refuse_codes():
  for codebook, n, vocab in (('rgb64', 0, 384), ('palette', 0, 512), ('rgb64', 120, 384),
                             ('rgb64', 121, 512), ('palette', 16, 512), ('rgb64', 1024, 1408)):
    assert tok.vocab_size(codebook, n) == vocab
  config = dense.get_config('tiny,data=scenes')
  config.data.image_vocab_size = 1024
  assert config.model.vocab_size == 1408  # follows, from the palette codebook's 512
  config.model.vocab_size = 2048  # unless set itself
  config.data.image_vocab_size = 8
  assert config.model.vocab_size == 2048
  config.data.image_tokens_key = 'codes'
  with pytest.raises(ValueError, match="image_tokens_key='codes' is not a feature of "
                                       "'mm_scenes'"):
    pipeline.make_eval_iterator(config.data, seq_len=32, batch_size=8)
  np.testing.assert_array_equal(tok.modality_of([tok.EOI, 263, 264, 455, 456, 5000]),
                                [0, 0, 1, 1, 1, 1])
