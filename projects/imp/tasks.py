"""Per-task input pipelines for IMP's alternating-gradient training (projects/imp/schedules.py).

A task reads one TFDS dataset (the embedded `mm_shapes` by default) at its own image
resolution and text length and yields batches for one objective:

  classify     {'image': float32 [b, R, R, 3] in [0, 1], 'label': int32 [b]}
  contrastive  {'image', 'text': int32 [b, L], 'text_mask': float32 [b, L]}
  caption      the same keys as contrastive (the model predicts text from the image)

Text is `[BOS] bytes [EOS]` in the shared vocabulary (data/tokenizer.py), PAD-padded or cut
to L. Images are resized to R x R with PIL's box filter when R differs from the stored size.
Like data/pipeline.py, records are shuffled over the whole split every epoch, each process
reads only its rows of each global batch, and `get_state()` counts global batches, so a
task's position is resumable and independent of the process count.
"""

from __future__ import annotations

from typing import Optional

import grain
import ml_collections
import numpy as np
from PIL import Image

from data import pipeline
from data import tokenizer as tok

KINDS = ('classify', 'contrastive', 'caption')
TASK_KEYS = ('kind', 'image_size', 'text_len', 'batch_size')


def check_task(name: str, task: ml_collections.ConfigDict) -> None:
  """One ValueError naming the task and the key for each problem."""
  missing = [k for k in TASK_KEYS if k not in task]
  if missing:
    raise ValueError(f'task {name!r} lacks keys {missing}')
  if task.kind not in KINDS:
    raise ValueError(f'task {name!r}: kind={task.kind!r} is not one of {KINDS}')
  for key in ('image_size', 'batch_size') + (('text_len',) if task.kind != 'classify' else ()):
    value = task[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f'task {name!r}: {key}={value!r} must be a positive integer')


def encode_caption(text, length: int) -> tuple[np.ndarray, np.ndarray]:
  """-> ([BOS] bytes [EOS] PAD-padded or cut to `length`, its 0/1 mask)."""
  if isinstance(text, np.ndarray):
    text = text.item()
  if isinstance(text, str):
    text = text.encode('utf-8')
  seq = np.concatenate([[tok.BOS], tok.encode_bytes(bytes(text)), [tok.EOS]])[:length]
  out = np.full(length, tok.PAD, np.int32)
  out[:len(seq)] = seq
  return out, (out != tok.PAD).astype(np.float32)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] -> float32 [size, size, 3] in [0, 1]."""
  image = np.asarray(image, np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.shape[:2] != (size, size):
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.BOX))
  return image.astype(np.float32) / 255.0


class _Encode(grain.transforms.Map):
  """A record -> the task's example (no randomness: the shuffle is the only one)."""

  def __init__(self, data_cfg, task, labels: bool):
    self.kind, self.size, self.labels = task.kind, task.image_size, labels
    self.text_len = task.get('text_len', 0)
    self.image_key, self.text_key = data_cfg.image_key, data_cfg.text_key
    self.label_key = data_cfg.label_key

  def map(self, record):
    out = {'image': resize(record[self.image_key], self.size)}
    if self.kind == 'classify' or self.labels:
      out['label'] = np.int32(record[self.label_key])
    if self.kind != 'classify':
      out['text'], out['text_mask'] = encode_caption(record[self.text_key], self.text_len)
    return out


def task_data_config(data_cfg, task) -> ml_collections.ConfigDict:
  """data_cfg with the task's `dataset` (if set) as tfds_name."""
  data_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  if task.get('dataset'):
    data_cfg.tfds_name = task.dataset
  return data_cfg


def class_names(data_cfg, task) -> Optional[list[str]]:
  """The label names of the task's dataset (data_cfg.label_key), None if it has none."""
  return pipeline.class_names(task_data_config(data_cfg, task))


def make_task_iterator(name: str, task: ml_collections.ConfigDict,
                       data_cfg: ml_collections.ConfigDict, *, seed: int,
                       split_key: str = 'train_split', process_index: int = 0,
                       process_count: int = 1, repeat: bool = True,
                       num_examples: Optional[int] = None, labels: bool = False):
  """Resumable iterator of this process's batches of task `name` (module docstring).

  The task's `dataset` (if set) replaces data_cfg.tfds_name. The eval split is read in
  order (no shuffle, no repeat) with `repeat=False`; its last partial batch is dropped.
  `labels=True` adds 'label' (data_cfg.label_key) to every kind's batches (eval's
  zero-shot classification).
  """
  check_task(name, task)
  data_cfg = task_data_config(data_cfg, task)
  pipeline.check_process(task.batch_size, process_index, process_count)
  source, _ = pipeline.data_source(data_cfg, split_key)
  ds = grain.MapDataset.source(source)
  if num_examples:
    ds = ds[:num_examples]
  if not len(ds):
    raise ValueError(f'task {name!r}: split {data_cfg[split_key]!r} has no records')
  if repeat:
    ds = ds.seed(seed).shuffle().repeat(None)
  ds = ds.map(_Encode(data_cfg, task, labels))
  local = task.batch_size // process_count
  if process_count > 1:
    ds = pipeline.ProcessRows(ds, local, process_index, process_count)
  it = pipeline.finish(ds, local, data_cfg.num_workers)
  return iter(it) if repeat else it
