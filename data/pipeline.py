"""Grain input pipelines over any TFDS dataset prepared as array_record.

Every record becomes one early-fusion sequence (see `tokenizer`): its text
(`data.text_key`, or the class name of `data.label_key` when there is no text)
and/or its image (`data.image_key`), in the order given by `data.order`, cut or
padded to seq_len + 1 tokens and shifted into (tokens, targets). A dataset that carries its
own image codes (`data.image_tokens_key`: an integer feature, e.g. from the user's VQ
tokenizer, with `data.image_vocab_size` codes) gives its image tokens from them instead of
`data.image_key` (then not read); a code outside [0, data.image_vocab_size) stops the
pipeline naming the record. data/import_pairs.py writes such datasets from (image,
caption) pairs (docs/own_data.md).

Train: all records -> global shuffle, reshuffled each epoch -> repeat forever
-> encode -> this process's rows of each global batch (`ProcessRows`) -> batch.
Everything is a function of (seed, position in the stream), so `get_state()` is just that position and a
restored iterator yields exactly the batches the uninterrupted one would.

Generated datasets (`mm_scenes`, data/scenes.py) are read the same way, except that
their train split is a stream of fresh examples read in order (no shuffle, no epochs).

Eval: the first num_examples records (all by default) in order, the same
per-process slicing, order chosen by record index parity for 'both'; the last
batch is filled with all-PAD rows (loss_mask 0) and every process yields the
same number of batches. With `with_floor` (the embedded datasets only: `floor_model`),
each example also holds `floor` [seq_len]: every target's exact Bayes-optimal loss
(data/floor.py), 0 on padding.
"""

import functools
import math
import os
import re
from typing import Any, Optional

from absl import logging
import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from data import floor
from data import remote
from data import scenes
from data import shapes
from data import tokenizer as tok

ORDERS = ('both', 'text_first', 'image_first')
REQUIRED_KEYS = ('tfds_name', 'data_dir', 'train_split', 'eval_split',
                 'text_key', 'image_key', 'label_key', 'image_size',
                 'patch_size', 'order', 'num_workers')
_READ_THREADS = 2  # threads decoding records when num_workers == 0 (2 cores)


# ---------------------------------------------------------------------------
# Config validation and data sources.


def resolve_data_dir(data_dir: str) -> str:
  """'' -> $TFDS_DATA_DIR or ~/tensorflow_datasets (never inside the repo); a local path made
  absolute, a gs:// one kept."""
  data_dir = (data_dir or os.environ.get('TFDS_DATA_DIR')
              or '~/tensorflow_datasets')
  if remote.is_remote(data_dir):
    return data_dir.rstrip('/')
  return os.path.abspath(os.path.expanduser(data_dir))


def dataset_dir(cfg) -> str:
  """The local data dir cfg's dataset is read from: data.data_dir resolved, or, for one on
  an object store, its local mirror (data/remote.py)."""
  data_dir = resolve_data_dir(cfg.data_dir)
  return remote.local_mirror(data_dir, cfg.tfds_name) if remote.is_remote(data_dir) else data_dir


def _split_names(split: str) -> list[str]:
  """'train[:90%]+test' -> ['train', 'test']."""
  return [re.sub(r'\[.*\]$', '', s.strip()) for s in split.split('+')]


def check_config(cfg) -> None:
  """ValueError naming the data key at fault (run by training/validate.py first)."""
  missing = [k for k in REQUIRED_KEYS if k not in cfg]
  if missing:
    raise ValueError(f'data config is missing keys {missing}')
  if not cfg.text_key and not cfg.image_key and not image_tokens_key(cfg):
    raise ValueError('data config needs data.text_key or data.image_key (or '
                     'data.image_tokens_key): all are empty')
  if '://' in str(cfg.data_dir) and not remote.is_remote(cfg.data_dir):
    raise ValueError(f'data.data_dir={cfg.data_dir}: object stores supported: '
                     f'{remote.REMOTE_PREFIXES}')
  n = image_vocab_size(cfg)
  if not isinstance(n, int) or isinstance(n, bool) or n < 0:
    raise ValueError(f'data.image_vocab_size={n!r} must be an int >= 0')
  if image_tokens_key(cfg) and not n:
    raise ValueError(f'data.image_tokens_key={image_tokens_key(cfg)!r} needs '
                     'data.image_vocab_size > 0: the number of codes of the tokenizer '
                     'that made them')
  size, patch = cfg.image_size, cfg.patch_size
  if not (isinstance(size, int) and isinstance(patch, int) and size > 0
          and patch > 0 and size % patch == 0):
    raise ValueError(f'data.image_size={size} must be a positive multiple of '
                     f'data.patch_size={patch}')
  if cfg.order not in ORDERS:
    raise ValueError(f'data.order={cfg.order!r} is not one of {ORDERS}')
  if not isinstance(cfg.num_workers, int) or cfg.num_workers < 0:
    raise ValueError(f'data.num_workers={cfg.num_workers} must be an int >= 0')
  tok.check_codebook(codebook(cfg))
  if codebook(cfg) == 'palette' and patch % 2:
    raise ValueError(f"data.codebook='palette' needs an even data.patch_size, got {patch}")


def codebook(cfg) -> str:
  """data.codebook ('rgb64' for configs written before it existed)."""
  return cfg.get('codebook', 'rgb64')


def image_tokens_key(cfg) -> str:
  """data.image_tokens_key ('' = off, also for configs written before it existed)."""
  return cfg.get('image_tokens_key', '')


def image_vocab_size(cfg) -> int:
  """data.image_vocab_size (0 = the built-in codebook's)."""
  return cfg.get('image_vocab_size', 0)


def _is_scenes(cfg) -> bool:
  return cfg.tfds_name.split('/')[0] == scenes.NAME


def _scenes_source(cfg, split: str):
  """mm_scenes: generated on the fly, no files; its keys checked like a TFDS dataset's."""
  spec = scenes.parse_name(cfg.tfds_name)
  for role, key, want in (('text_key', cfg.text_key, 'caption'),
                          ('image_key', cfg.image_key, 'image')):
    if key not in ('', want):
      raise ValueError(f"data.{role}={key!r} is not a feature of {cfg.tfds_name!r}; "
                       f"features: ['caption', 'image']")
  if image_tokens_key(cfg):
    raise ValueError(f'data.image_tokens_key={image_tokens_key(cfg)!r} is not a feature '
                     f"of {cfg.tfds_name!r}; features: ['caption', 'image']")
  if not cfg.text_key and cfg.label_key:
    raise ValueError(f'data.label_key={cfg.label_key!r}: {cfg.tfds_name!r} has no labels; '
                     "set data.label_key=''")
  if split not in scenes.SPLITS:
    raise ValueError(f'split {split!r} of {cfg.tfds_name!r}: splits: {list(scenes.SPLITS)}')
  return scenes.Source(spec, split), None


def _is_text(f) -> bool:
  return isinstance(f, tfds.features.Text) or (
      type(f) is tfds.features.Tensor and not f.shape
      and f.np_dtype in (np.object_, np.str_, np.bytes_))


def _is_image(f) -> bool:
  return isinstance(f, tfds.features.Image) or (
      type(f) is tfds.features.Tensor and len(f.shape) in (2, 3)
      and f.np_dtype == np.uint8)


def _is_codes(f) -> bool:
  if isinstance(f, tfds.features.Sequence):
    f = f.feature
  return (type(f) is tfds.features.Tensor or isinstance(f, tfds.features.Scalar)) and (
      np.issubdtype(f.np_dtype, np.integer))


def _check_features(cfg, features) -> Optional[list[str]]:
  """Checks the keys against the dataset; returns label names or None."""
  name = cfg.tfds_name
  codes = image_tokens_key(cfg)
  for role, key, ok, want in (
      ('text_key', cfg.text_key, _is_text, 'text (tfds Text)'),
      ('image_key', '' if codes else cfg.image_key, _is_image,
       'image (tfds Image, or a uint8 Tensor of rank 2 or 3)'),
      ('image_tokens_key', codes, _is_codes,
       'integer Tensor (image codes, raster order)')):
    if not key:
      continue
    if key not in features:
      raise ValueError(f'data.{role}={key!r} is not a feature of {name!r}; '
                       f'features: {sorted(features.keys())}')
    if not ok(features[key]):
      raise ValueError(f'data.{role}={key!r} of {name!r} is a '
                       f'{type(features[key]).__name__}, not an {want}')
  if cfg.text_key or not cfg.label_key:
    return None
  label = features[cfg.label_key] if cfg.label_key in features else None
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f'data.label_key={cfg.label_key!r} is not a ClassLabel '
                     f'feature of {name!r} (needed as caption since '
                     "data.text_key=''); set data.label_key='' to drop it")
  return list(label.names)


def _builder(cfg, data_dir: str) -> tfds.core.DatasetBuilder:
  if cfg.tfds_name == shapes.MmShapes.name:
    return shapes.MmShapes(data_dir=data_dir)
  try:
    return tfds.builder(cfg.tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f'data.tfds_name={cfg.tfds_name!r}: unknown TFDS dataset '
                     f'(not registered, nothing under {data_dir})') from None
  except AssertionError as e:  # TFDS's way of saying: no such version
    detail = str(e).split(': ', 1)[-1].rsplit('": ', 1)[-1]
    raise ValueError(f'data.tfds_name={cfg.tfds_name!r}: {detail}') from None


def class_names(cfg) -> Optional[list[str]]:
  """The names of cfg.label_key's classes (a tfds ClassLabel), or None without one."""
  check_config(cfg)
  if _is_scenes(cfg):
    return None
  features = _builder(cfg, dataset_dir(cfg)).info.features
  label = features[cfg.label_key] if cfg.label_key and cfg.label_key in features else None
  return list(label.names) if isinstance(label, tfds.features.ClassLabel) else None


def data_source(cfg, split_key: str) -> tuple[Any, Optional[list[str]]]:
  """Validates cfg; returns (source of cfg[split_key], label names)."""
  check_config(cfg)
  split = cfg[split_key]
  if _is_scenes(cfg):
    return _scenes_source(cfg, split)
  data_dir = dataset_dir(cfg)
  builder = _builder(cfg, data_dir)
  label_names = _check_features(cfg, builder.info.features)
  is_shapes = cfg.tfds_name == shapes.MmShapes.name
  known = list(shapes.SPLITS) if is_shapes else list(builder.info.splits)
  # Unprepared (or mocked) datasets do not know their splits yet.
  for s in _split_names(split) if known else []:
    if s not in known:
      raise ValueError(f'split {split!r} of {cfg.tfds_name!r}: no split {s!r}; '
                       f'splits: {known}')
  if is_shapes:
    builder = shapes.prepare(data_dir)
  try:
    source = builder.as_data_source(split)
  except Exception as e:  # pylint: disable=broad-except
    if builder.is_prepared():
      raise ValueError(f'cannot read {cfg.tfds_name!r} split {split!r} under '
                       f'{data_dir} with random access: {e}') from e
    raise ValueError(
        f'dataset {cfg.tfds_name!r} is not prepared under data_dir={data_dir}; '
        f'prepare it with tfds.builder({cfg.tfds_name!r}, data_dir=...)'
        ".download_and_prepare(file_format='array_record')") from e
  if image_tokens_key(cfg):
    source = _CheckedCodes(source, split, image_tokens_key(cfg), image_vocab_size(cfg))
  return source, label_names


class _CheckedCodes:
  """A data source whose records' image codes are checked as they are read, so a bad
  one is named by its record index in the split."""

  def __init__(self, source, split: str, key: str, n: int):
    self.source, self.split, self.key, self.n = source, split, key, n

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    record = self.source[index]
    try:
      tok.encode_codes(record[self.key], self.n)
    except ValueError as e:
      raise ValueError(f'record {index} of split {self.split!r}: '
                       f'data.image_tokens_key={self.key!r}: {e}') from None
    return record


# ---------------------------------------------------------------------------
# Record -> example.


def _text_bytes(value, max_len: int) -> bytes:
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, str):
    value = value.encode('utf-8')
  return bytes(value[:max_len])


class _Encoder:
  """A record -> a to_example() dict for a fixed config and seq_len."""

  def __init__(self, cfg, seq_len: int, label_names: Optional[list[str]]):
    self.text_key, self.image_key = cfg.text_key, cfg.image_key
    self.label_key, self.label_names = cfg.label_key, label_names
    self.codes_key, self.image_vocab_size = image_tokens_key(cfg), image_vocab_size(cfg)
    self.image_size, self.patch_size = cfg.image_size, cfg.patch_size
    self.codebook = codebook(cfg)
    self.order, self.seq_len = cfg.order, seq_len

  def image_first(self, coin: bool) -> bool:
    return coin if self.order == 'both' else self.order == 'image_first'

  def __call__(self, record, image_first: bool) -> dict[str, np.ndarray]:
    return tok.to_example(self.sequence(record, image_first), self.seq_len)

  def sequence(self, record, image_first: bool) -> np.ndarray:
    text = image = None
    if self.text_key:
      text = tok.encode_bytes(_text_bytes(record[self.text_key], self.seq_len))
    elif self.label_names is not None:
      text = tok.encode_text(self.label_names[int(record[self.label_key])])
    if self.codes_key:
      image = tok.encode_codes(record[self.codes_key], self.image_vocab_size)
    elif self.image_key:
      image = tok.encode_image(record[self.image_key], self.image_size,
                               self.patch_size, self.codebook)
    return tok.build_sequence(text, image, image_first)


def eval_sequence(cfg, seq_len: int, index: int, *, image_first: bool) -> np.ndarray:
  """Record `index` of the eval split as one token sequence in the given order (the
  generation prompts of sample.py --from_eval)."""
  source, label_names = data_source(cfg, 'eval_split')
  if not 0 <= index < len(source):
    raise ValueError(f'--from_eval={index}: the eval split {cfg.eval_split!r} has '
                     f'{len(source)} examples (0 .. {len(source) - 1})')
  return _Encoder(cfg, seq_len, label_names).sequence(source[index], image_first)


class _TrainMap(grain.transforms.RandomMap):
  """Encodes with a per-(seed, stream position) coin for order='both'."""

  def __init__(self, encoder: _Encoder):
    self.encoder = encoder

  def random_map(self, record, rng: np.random.Generator):
    return self.encoder(record, self.encoder.image_first(rng.random() < 0.5))


class _EvalMap(grain.transforms.Map):
  """(record index, record or None) -> example, or an all-PAD row; with a floor model
  (`floor_model`) the example also holds `floor`."""

  def __init__(self, encoder: _Encoder, floor_cfg=None):
    self.encoder, self.floor_cfg = encoder, floor_cfg

  def map(self, element):
    index, record = element
    seq_len = self.encoder.seq_len
    if record is None:
      example = tok.pad_example(seq_len)
      seq = None
    else:
      seq = self.encoder.sequence(record, self.encoder.image_first(index % 2 == 1))
      example = tok.to_example(seq, seq_len)
    if self.floor_cfg is not None:
      example['floor'] = (np.zeros(seq_len, np.float32) if seq is None else
                          floor.floor_of_example(seq, seq_len, *floor_model(self.floor_cfg)))
    return example


class _PaddedSlice:
  """Records start, start+step, ... below stop, then None up to `length`."""

  def __init__(self, source, start: int, step: int, stop: int, length: int):
    self.source, self.start, self.step = source, start, step
    self.stop, self.length = stop, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, k: int):
    index = self.start + k * self.step
    return index, (self.source[index] if index < self.stop else None)


def check_process(global_batch_size, process_index, process_count):
  if not 0 <= process_index < process_count:
    raise ValueError(f'{process_index=} not in [0, {process_count=})')
  if global_batch_size % process_count:
    raise ValueError(f'batch size {global_batch_size} is not divisible by '
                     f'{process_count=}')


class ProcessRows(grain.MapDataset):
  """This process's rows of the global batches: element k is row k % local of this
  process's part (rows [p * local, (p + 1) * local)) of global batch k // local. So the
  global batches, and the random coin of each element, do not depend on the number of
  processes, and each process reads only its own rows."""

  def __init__(self, parent: grain.MapDataset, local: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self.local, self.index, self.count = local, process_index, process_count

  def __len__(self) -> int:
    return len(self._parent) // self.count

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    batch, row = divmod(k, self.local)
    return self._parent[(batch * self.count + self.index) * self.local + row]


def finish(ds: grain.MapDataset, batch_size: int, num_workers: int):
  # Batching the MapDataset makes batch k the same whatever num_workers is:
  # worker processes (or read threads) each build whole batches, round robin.
  ds = ds.batch(batch_size, drop_remainder=True)
  read = grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=4)
  it = ds.to_iter_dataset(read)
  if num_workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


# ---------------------------------------------------------------------------
# Public API.


def make_train_iterator(data_cfg: ml_collections.ConfigDict, *, seq_len: int,
                        global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1):
  """Infinite, resumable iterator of this process's training batches.

  Yields dicts of numpy arrays tokens, targets, modality, target_modality
  (int32) and loss_mask (float32), each [global_batch_size // process_count,
  seq_len]: this process's rows of the global batch, which is the same for any
  process_count (records shuffled over the whole split, every epoch). The iterator has get_state() / set_state(state); the state is a
  small JSON-serialisable dict. Batches do not depend on data.num_workers,
  but the state's format does: restore with the same num_workers.
  """
  check_process(global_batch_size, process_index, process_count)
  source, label_names = data_source(data_cfg, 'train_split')
  ds = grain.MapDataset.source(source).seed(seed)
  if not len(ds):
    raise ValueError(f'split {data_cfg.train_split!r} has no records')
  if not _is_scenes(data_cfg):  # a generated stream is fresh examples already
    ds = ds.shuffle().repeat(None)
  ds = ds.random_map(_TrainMap(_Encoder(data_cfg, seq_len, label_names)))
  batch = global_batch_size // process_count
  if process_count > 1:
    ds = ProcessRows(ds, batch, process_index, process_count)
  return iter(finish(ds, batch, data_cfg.num_workers))


def floor_support(cfg) -> Optional[str]:
  """None if `floor_model(cfg)` exists, else why not (one line for eval.json)."""
  name = cfg.tfds_name
  if name != shapes.MmShapes.name and not _is_scenes(cfg):
    return f'{name!r} is not an embedded dataset: its floor is unknown'
  if not (cfg.text_key and cfg.image_key):
    return 'the floor is computed for caption + image sequences only'
  native = (shapes.IMAGE_SIZE if name == shapes.MmShapes.name
            else scenes.parse_name(name).image_size)
  if cfg.image_size != native:
    return (f'data.image_size={cfg.image_size} resizes the {native} px images: the floor '
            'is computed at their own size only')
  if _is_scenes(cfg) and scenes.CELL_PX % cfg.patch_size:
    return f'data.patch_size={cfg.patch_size} does not divide the {scenes.CELL_PX} px cells'
  return None


def floor_model(cfg) -> tuple[object, float]:
  """(the dataset's floor model for this tokenisation, P(image first)) (data/floor.py)."""
  reason = floor_support(cfg)
  if reason:
    raise ValueError(f'no exact floor: {reason}')
  p_image_first = {'both': 0.5, 'text_first': 0.0, 'image_first': 1.0}[cfg.order]
  return _floor_model(cfg.tfds_name, cfg.patch_size, codebook(cfg)), p_image_first


@functools.cache
def _floor_model(name: str, patch_size: int, codebook_name: str):
  if name == shapes.MmShapes.name:
    return shapes.FloorModel(shapes.SPEC, patch_size, codebook_name)
  return scenes.FloorModel(scenes.parse_name(name), patch_size, codebook_name)


def make_eval_iterator(data_cfg: ml_collections.ConfigDict, *, seq_len: int,
                       batch_size: int, num_examples: Optional[int] = None,
                       process_index: int = 0, process_count: int = 1,
                       with_floor: bool = False):
  """Finite, re-iterable batches over the eval split in a fixed order.

  batch_size is global, like make_train_iterator's: each process yields
  [batch_size // process_count, seq_len] batches. Covers the first
  num_examples records (all if None), record i on process i % process_count.
  Rows past the end are all PAD with loss_mask 0, and all processes yield the
  same number of batches. `with_floor`: examples hold `floor` (requires floor_support).
  """
  check_process(batch_size, process_index, process_count)
  if with_floor and floor_support(data_cfg):
    raise ValueError(f'no exact floor: {floor_support(data_cfg)}')
  source, label_names = data_source(data_cfg, 'eval_split')
  n = len(source) if num_examples is None else min(num_examples, len(source))
  local_batch = batch_size // process_count
  num_batches = math.ceil(math.ceil(n / process_count) / local_batch)
  padded = _PaddedSlice(source, process_index, process_count, n,
                        num_batches * local_batch)
  ds = grain.MapDataset.source(padded)
  ds = ds.map(_EvalMap(_Encoder(data_cfg, seq_len, label_names),
                       data_cfg if with_floor else None))
  return finish(ds, local_batch, data_cfg.num_workers)


# ---------------------------------------------------------------------------
# What seq_len keeps.

TRUNCATION_SAMPLE = 256  # eval records measured by `truncation`


def truncation(data_cfg: ml_collections.ConfigDict, seq_len: int,
               sample: int = TRUNCATION_SAMPLE) -> dict:
  """How `seq_len` cuts the sequences of the first `sample` eval records, in each order the
  config trains on -> {'sequences', 'truncated' (fraction cut), 'longest' (tokens, the
  seq_len that fits them all is longest - 1), 'dropped': {modality: fraction of the
  sequences holding it that keep none of its target tokens}}."""
  source, label_names = data_source(data_cfg, 'eval_split')
  encoder = _Encoder(data_cfg, 1 << 30, label_names)  # whole sequences
  orders = (False, True) if data_cfg.order == 'both' else (data_cfg.order == 'image_first',)
  cut = count = longest = 0
  holding, dropped = np.zeros(len(tok.MODALITIES)), np.zeros(len(tok.MODALITIES))
  for i in range(min(sample, len(source))):
    record = source[i]
    for image_first in orders:
      seq = np.asarray(encoder.sequence(record, image_first))
      count += 1
      longest = max(longest, len(seq))
      cut += len(seq) > seq_len + 1
      whole = np.bincount(tok.modality_of(seq[1:]), minlength=len(tok.MODALITIES)) > 0
      kept = np.bincount(tok.modality_of(seq[1:seq_len + 1]),
                         minlength=len(tok.MODALITIES)) > 0
      holding += whole
      dropped += whole & ~kept
  return {'sequences': count, 'truncated': cut / max(count, 1), 'longest': longest,
          'dropped': {name: float(d / h) for name, d, h in zip(tok.MODALITIES, dropped, holding)
                      if h}}


def check_seq_len(data_cfg: ml_collections.ConfigDict, seq_len: int) -> dict:
  """Log the fraction of sequences `seq_len` truncates; ValueError when it drops a whole
  modality (none of its tokens kept in any sampled sequence). -> `truncation`'s dict."""
  t = truncation(data_cfg, seq_len)
  fits = t['longest'] - 1
  gone = [m for m, f in t['dropped'].items() if f == 1.0]
  if gone:
    raise ValueError(f'config.seq_len={seq_len} drops every {" and ".join(gone)} token of '
                     f"the {t['sequences']} sampled sequences: nothing would train on "
                     f'{"them" if len(gone) > 1 else "it"}; seq_len={fits} fits them all')
  if t['truncated']:
    whole = ''.join(f'; all {m} tokens cut from {100 * f:.1f}%'
                    for m, f in t['dropped'].items() if f)
    logging.warning('config.seq_len=%d truncates %.1f%% of the sequences (of %d sampled eval '
                    'sequences%s); seq_len=%d fits them all', seq_len, 100 * t['truncated'],
                    t['sequences'], whole, fits)
  elif seq_len > 2 * fits:
    logging.warning('config.seq_len=%d is over twice the longest of %d sampled eval sequences '
                    '(%d tokens): most of every row is padding; seq_len=%d fits them all',
                    seq_len, t['sequences'], t['longest'], fits)
  else:
    logging.info('config.seq_len=%d fits all %d sampled eval sequences (longest %d tokens)',
                 seq_len, t['sequences'], t['longest'])
  return t
