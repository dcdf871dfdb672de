"""projects/imp/tasks.py: each IMP task's batches (shapes, contents, resolution, resume, process
rows) and its bad task specs."""

import json

import ml_collections
import numpy as np
import pytest

from data import shapes, tokenizer
from projects.imp import tasks as imp_tasks
from tests.test_data import make_cfg, take


def task(**kw):
  return ml_collections.ConfigDict({'kind': 'classify', 'image_size': 32, 'text_len': 48,
                                    'batch_size': 8, **kw})


@pytest.mark.parametrize('kind,size', [('classify', 32), ('classify', 16),
                                       ('contrastive', 32), ('caption', 16)])
def test_batches_of_each_kind_and_resolution(data_dir, kind, size):
  it = imp_tasks.make_task_iterator('t', task(kind=kind, image_size=size), make_cfg(data_dir),
                                    seed=0)
  batch = next(it)
  assert batch['image'].shape == (8, size, size, 3) and batch['image'].dtype == np.float32
  assert 0 <= batch['image'].min() and batch['image'].max() <= 1 and batch['image'].max() > 0
  if kind == 'classify':
    assert batch['label'].shape == (8,) and set(batch['label']) <= set(range(6))
    assert set(batch) == {'image', 'label'}
  else:
    assert batch['text'].shape == batch['text_mask'].shape == (8, 48)
    assert (batch['text'][:, 0] == tokenizer.BOS).all()
    np.testing.assert_array_equal(batch['text_mask'], batch['text'] != tokenizer.PAD)


def test_text_is_the_caption_and_the_label_is_its_shape(data_dir):
  """In order (eval split), the rows are the records: caption bytes and the label's kind."""
  cfg = make_cfg(data_dir)
  src = shapes.prepare(data_dir).as_data_source('test')
  text = next(iter(imp_tasks.make_task_iterator(
      't', task(kind='caption', text_len=96), cfg, seed=0, split_key='eval_split',
      repeat=False)))
  label = next(iter(imp_tasks.make_task_iterator(
      't', task(), cfg, seed=0, split_key='eval_split', repeat=False)))
  for i in range(8):
    caption = tokenizer.decode_text(text['text'][i])
    want = src[i]['caption']
    assert caption == (want.decode() if isinstance(want, bytes) else want)
    assert shapes.KINDS[label['label'][i]] in caption
  # 16 x 16 is the 2 x 2 box average of the 32 x 32 image
  small = next(iter(imp_tasks.make_task_iterator(
      't', task(image_size=16), cfg, seed=0, split_key='eval_split', repeat=False)))
  big = next(iter(imp_tasks.make_task_iterator(
      't', task(), cfg, seed=0, split_key='eval_split', repeat=False)))
  pooled = big['image'].reshape(8, 16, 2, 16, 2, 3).mean((2, 4))
  np.testing.assert_allclose(small['image'], pooled, atol=1 / 255 + 1e-6)


def test_resumes_and_process_rows_make_the_global_batch(data_dir):
  cfg, t = make_cfg(data_dir), task(kind='contrastive')
  whole = take(imp_tasks.make_task_iterator('t', t, cfg, seed=3), 4)
  it = imp_tasks.make_task_iterator('t', t, cfg, seed=3, process_index=1, process_count=2)
  parts = take(it, 2)
  other = take(imp_tasks.make_task_iterator('t', t, cfg, seed=3, process_index=0,
                                            process_count=2), 2)
  for k in range(2):
    np.testing.assert_array_equal(np.concatenate([other[k]['text'], parts[k]['text']]),
                                  whole[k]['text'])
  fresh = imp_tasks.make_task_iterator('t', t, cfg, seed=3)
  fresh.set_state(json.loads(json.dumps(it.get_state())))
  np.testing.assert_array_equal(next(fresh)['image'], whole[2]['image'])
  assert not np.array_equal(next(imp_tasks.make_task_iterator('t', t, cfg, seed=4))['text'],
                            whole[0]['text'])


@pytest.mark.parametrize('spec,words', [
    ({'kind': 'segment'}, "kind='segment' is not one of"),
    ({'image_size': 0}, 'image_size=0 must be a positive integer'),
    ({'batch_size': 2.5}, 'batch_size=2.5 must be a positive integer'),
    ({'kind': 'caption', 'text_len': -1}, 'text_len=-1 must be a positive integer'),
])
def test_bad_task_specs(data_dir, spec, words):
  with pytest.raises(ValueError, match="task 'bad'") as err:
    imp_tasks.make_task_iterator('bad', task(**spec), make_cfg(data_dir), seed=0)
  assert words in str(err.value)
