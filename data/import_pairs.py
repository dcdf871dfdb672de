"""Your own (image, caption) pairs -> a TFDS dataset that train.py reads (docs/own_data.md).

  python -m data.import_pairs --src=PATH --name=NAME [--data_dir=DIR]
      [--eval_fraction=0.1 | --eval_src=PATH] [--image_size=32] [--skip_bad]

--src (and --eval_src) is a folder of images with same-named captions (cat.png + cat.txt,
searched recursively), or a JSONL file whose rows hold an image path relative to the file's
folder (--image_field), a caption (--caption_field) and optionally the image's own codes
(--image_tokens_field: a list of ints from the user's image tokenizer; --image_field='' if
rows hold codes only). Images are centre-cropped to a square, resized to --image_size and
stored as RGB PNG. Without --eval_src a pair is in the test split when the hash of its file
name (a codes-only row: its line number) is under --eval_fraction (at least one pair is).
Every pair is read (into memory) and checked before anything is written; an error is one
line naming the file. Written as array_record in DATA_DIR/NAME/1.0.0 (features `caption`,
`image` and/or `image_tokens`); prints the train.py overrides that read it.
"""

import dataclasses
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import sys
from typing import Optional

from absl import app, flags, logging
from etils import epath
import numpy as np
from PIL import Image, ImageOps
import tensorflow_datasets as tfds

from data import pipeline, scenes

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.gif', '.bmp', '.webp', '.tif', '.tiff')
VERSION = '1.0.0'
PATCH_SIZE = 4  # the configs' data.patch_size, for the printed seq_len

flags.DEFINE_string('src', None, 'Folder of IMAGE + IMAGE.txt pairs, or a JSONL file.')
flags.DEFINE_string('name', None, 'Dataset name, lower_snake_case (data.tfds_name).')
flags.DEFINE_string('data_dir', '', "TFDS data dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.")
flags.DEFINE_string('eval_src', '', 'Folder or JSONL of the test split (all of --src: train).')
flags.DEFINE_float('eval_fraction', 0.1, 'Share of --src for test, by file name hash.')
flags.DEFINE_integer('image_size', 32, f'Side of the stored square images (k * {PATCH_SIZE}).')
flags.DEFINE_string('image_field', 'image', "JSONL: key of the image path; '' = no images.")
flags.DEFINE_string('caption_field', 'caption', 'JSONL: key of the caption.')
flags.DEFINE_string('image_tokens_field', '', "JSONL: key of the image's codes (int list).")
flags.DEFINE_integer('image_vocab_size', 0, 'Codes must be below it; 0 = print max + 1.')
flags.DEFINE_bool('skip_bad', False, 'Skip and count undecodable images / empty captions.')
flags.DEFINE_bool('overwrite', False, 'Replace DATA_DIR/NAME/1.0.0 if it exists.')
FLAGS = flags.FLAGS


@dataclasses.dataclass
class Pair:
  """One example before it is read."""
  key: str  # hashed for the split: the image's file name, or 'line N'
  where: str  # names it in errors: the caption file, or 'FILE line N'
  caption: Optional[str] = None  # JSONL (a folder pair reads caption_path)
  caption_path: Optional[str] = None
  image_path: Optional[str] = None
  codes: Optional[np.ndarray] = None  # the image's own codes, int [N]


def folder_pairs(src: str) -> list[Pair]:
  """IMAGE.ext + IMAGE.txt under src (recursively), sorted by relative path."""
  images, texts = {}, set()
  for root, dirs, files in os.walk(src):
    dirs.sort()
    for f in sorted(files):
      stem, ext = os.path.splitext(os.path.relpath(os.path.join(root, f), src))
      if ext.lower() in IMAGE_EXTS:
        images.setdefault(stem, stem + ext)
      elif ext == '.txt':
        texts.add(stem)
  pairs = [Pair(images[s], s + '.txt', caption_path=os.path.join(src, s + '.txt'),
                image_path=os.path.join(src, images[s])) for s in sorted(images) if s in texts]
  if not pairs:
    raise ValueError(f'no pairs found in {src}: expected images ({", ".join(IMAGE_EXTS)}) '
                     f'with same-named .txt captions; found {len(images)} images and '
                     f'{len(texts)} .txt files')
  if len(images) > len(pairs) or len(texts) > len(pairs):
    print(f'{src}: ignored {len(images) - len(pairs)} images without a .txt and '
          f'{len(texts) - len(pairs)} .txt files without an image')
  return pairs


def jsonl_pairs(src: str, image_field: str, caption_field: str,
                tokens_field: str) -> list[Pair]:
  """One pair per non-blank line; every named field must be in every row."""
  pairs, folder = [], os.path.dirname(os.path.abspath(src))
  with open(src, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{src} line {n}'
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: not JSON ({e})') from None
      if not isinstance(row, dict):
        raise ValueError(f'{where}: not a JSON object')
      for field in (image_field, caption_field, tokens_field):
        if field and field not in row:
          raise ValueError(f'{where}: no field {field!r} (fields: {sorted(row)}); '
                           'set --image_field / --caption_field / --image_tokens_field')
      image, caption = row.get(image_field), row[caption_field]
      if not isinstance(caption, str) or (image_field and not isinstance(image, str)):
        raise ValueError(f'{where}: {caption_field!r} and {image_field!r} must be strings')
      codes = row.get(tokens_field) if tokens_field else None
      if tokens_field and not (isinstance(codes, list) and all(
          type(c) is int and c >= 0 for c in codes)):  # pylint: disable=unidiomatic-typecheck
        raise ValueError(f'{where}: {tokens_field!r} must be a list of integers >= 0')
      pairs.append(Pair(image or f'line {n}', where, caption=caption,
                        codes=None if codes is None else np.asarray(codes, np.int64),
                        image_path=os.path.join(folder, image) if image_field else None))
  if not pairs:
    raise ValueError(f'no pairs found in {src}: it has no JSON rows')
  return pairs


def read_pairs(src: str, image_field: str, caption_field: str,
               tokens_field: str) -> list[Pair]:
  if not src or not os.path.exists(src):
    raise ValueError(f'--src={src!r}: no such file or folder')
  if not image_field and not tokens_field:
    raise ValueError("--image_field='' needs --image_tokens_field (rows need an image)")
  if os.path.isdir(src):
    return folder_pairs(src)
  return jsonl_pairs(src, image_field, caption_field, tokens_field)


def load_image(path: str, size: int) -> np.ndarray:
  """The image at `path`, centre-cropped to a square and resized: uint8 [size, size, 3]."""
  with Image.open(path) as im:
    im = ImageOps.exif_transpose(im).convert('RGB')
  w, h = im.size
  s = min(w, h)
  left, top = (w - s) // 2, (h - s) // 2
  im = im.crop((left, top, left + s, top + s))
  if s != size:
    im = im.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(im, np.uint8)


def split_hash(key: str) -> float:
  """A stable number in [0, 1) from a file name: which split the pair goes to."""
  return int.from_bytes(hashlib.sha256(key.encode('utf-8')).digest()[:8], 'big') / 2**64


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


def to_examples(pairs: list[Pair], size: int, image_vocab_size: int = 0,
                skip_bad: bool = False) -> tuple[list[dict], int]:
  """Reads and checks every pair -> (TFDS examples, number skipped as bad)."""
  examples, skipped = [], 0
  for p in pairs:
    try:
      caption = p.caption
      if p.caption_path:
        try:
          with open(p.caption_path, encoding='utf-8') as f:
            caption = f.read()
        except (OSError, UnicodeDecodeError) as e:
          raise ValueError(f'cannot read caption {p.caption_path}: {e}') from None
      if not caption.strip():
        raise ValueError(f'{p.where}: empty caption')
      ex = {'caption': caption.strip()}
      if p.image_path:
        try:
          ex['image'] = _png(load_image(p.image_path, size))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
          raise ValueError(f'cannot decode image {p.image_path} ({p.where}): {e}') from None
    except ValueError as e:
      if not skip_bad:
        raise ValueError(' '.join(str(e).split())) from None
      skipped += 1
      continue
    if p.codes is not None:
      if image_vocab_size and p.codes.size and p.codes.max() >= image_vocab_size:
        raise ValueError(f'{p.where}: image code {int(p.codes.max())} is outside [0, '
                         f'--image_vocab_size={image_vocab_size})')
      ex['image_tokens'] = p.codes.astype(np.int32)
    examples.append(ex)
  return examples, skipped


def split_pairs(pairs: list[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
  """(train, test) by split_hash; the lowest hash goes to test if none falls under."""
  if not 0 < fraction < 1:
    raise ValueError(f'--eval_fraction={fraction} must be in (0, 1) (or pass --eval_src)')
  if len(pairs) < 2:
    raise ValueError(f'{len(pairs)} pair: a train and a test split need at least 2 '
                     '(or pass --eval_src)')
  hashes = [split_hash(p.key) for p in pairs]
  test = {i for i, h in enumerate(hashes) if h < fraction} or {int(np.argmin(hashes))}
  if len(test) == len(pairs):
    test.discard(int(np.argmax(hashes)))
  return ([p for i, p in enumerate(pairs) if i not in test],
          [p for i, p in enumerate(pairs) if i in test])


class _Builder(tfds.dataset_builders.AdhocBuilder, skip_registration=True):
  """AdhocBuilder from plain lists of examples, without TensorFlow."""
  code_path = epath.Path(__file__)  # see data/shapes.py MmShapes.code_path

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: enumerate(examples) for split, examples in self._split_datasets.items()}


def check_name(name: str) -> None:
  if not name or not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise ValueError(f'--name={name!r} must be lower_snake_case, e.g. my_pairs')
  if name == scenes.NAME:
    raise ValueError(f'--name={name!r} is an embedded dataset; pick another name')
  try:
    tfds.builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError:
    return
  raise ValueError(f'--name={name!r} is a registered TFDS dataset; pick another name')


def write(name: str, data_dir: str, splits: dict[str, list[dict]], image_size: int,
          overwrite: bool = False) -> str:
  """Writes the examples of each split as array_record; returns the dataset's folder."""
  first = splits['train'][0]
  if any(set(ex) != set(first) for examples in splits.values() for ex in examples):
    raise ValueError(f'--src and --eval_src must both have {sorted(first)}')
  features = {'caption': tfds.features.Text()}
  if 'image' in first:
    features['image'] = tfds.features.Image(shape=(image_size, image_size, 3),
                                            encoding_format='png')
  if 'image_tokens' in first:
    features['image_tokens'] = tfds.features.Tensor(shape=(None,), dtype=np.int32)
  path = os.path.join(data_dir, name, VERSION)
  if os.path.exists(path):
    if not overwrite:
      raise ValueError(f'{path} exists; pass --overwrite to replace it')
    shutil.rmtree(path)
  builder = _Builder(name=name, version=VERSION, features=tfds.features.FeaturesDict(features),
                     split_datasets=splits, data_dir=data_dir, disable_shuffling=True,
                     description='(image, caption) pairs written by data/import_pairs.py')
  builder.download_and_prepare(file_format='array_record')
  return path


def overrides(name: str, data_dir: str, splits: dict[str, list[dict]], image_size: int,
              image_vocab_size: int = 0) -> list[str]:
  """The train.py / eval.py --config overrides that read the written dataset."""
  examples = splits['train'] + splits['test']
  out = [f'--config.data.tfds_name={name}', f'--config.data.data_dir={data_dir}',
         '--config.data.text_key=caption']
  if 'image_tokens' in examples[0]:
    vocab = image_vocab_size or 1 + max(int(e['image_tokens'].max(initial=0))
                                        for e in examples)
    out += ['--config.data.image_tokens_key=image_tokens',
            f'--config.data.image_vocab_size={vocab}']
    image_len = max(len(e['image_tokens']) for e in examples)
  else:
    out += ['--config.data.image_key=image', f'--config.data.image_size={image_size}']
    image_len = (image_size // PATCH_SIZE) ** 2
  longest = 4 + image_len + max(len(e['caption'].encode('utf-8')) for e in examples)
  return out + [f'--config.seq_len={-(-(longest - 1) // 16) * 16}']


def run(src: str, name: str, *, data_dir: str = '', eval_src: str = '',
        eval_fraction: float = 0.1, image_size: int = 32, image_field: str = 'image',
        caption_field: str = 'caption', image_tokens_field: str = '',
        image_vocab_size: int = 0, skip_bad: bool = False, overwrite: bool = False) -> dict:
  """The whole import (the flags' defaults) -> {path, counts, skipped, overrides}; a
  problem raises one-line ValueError."""
  if image_size <= 0 or image_size % PATCH_SIZE:
    raise ValueError(f'--image_size={image_size} must be a positive multiple of {PATCH_SIZE}')
  check_name(name)
  fields = (image_field, caption_field, image_tokens_field)
  pairs = read_pairs(src, *fields)
  if eval_src:
    parts = {'train': pairs, 'test': read_pairs(eval_src, *fields)}
  else:
    parts = dict(zip(('train', 'test'), split_pairs(pairs, eval_fraction)))
  splits, skipped = {}, 0
  for split, part in parts.items():
    splits[split], bad = to_examples(part, image_size, image_vocab_size, skip_bad)
    skipped += bad
    if not splits[split]:
      raise ValueError(f'the {split} split has no usable pairs')
  data_dir = pipeline.resolve_data_dir(data_dir)
  path = write(name, data_dir, splits, image_size, overwrite)
  return {'path': path, 'counts': {k: len(v) for k, v in splits.items()},
          'skipped': skipped,
          'overrides': overrides(name, data_dir, splits, image_size, image_vocab_size)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  tfds.disable_progress_bar()
  try:
    out = run(**{k: FLAGS[k].value for k in (
        'src', 'name', 'data_dir', 'eval_src', 'eval_fraction', 'image_size', 'image_field',
        'caption_field', 'image_tokens_field', 'image_vocab_size', 'skip_bad', 'overwrite')})
  except ValueError as e:
    sys.exit(f'import_pairs: error: {e}')
  name, counts = FLAGS.name, out['counts']
  print(f"wrote {counts['train']} train + {counts['test']} test pairs to {out['path']}"
        + (f" ({out['skipped']} bad pairs skipped)" if out['skipped'] else ''))
  print('train on them (any family: configs/dense.py, moe.py, moma.py, mot.py), e.g.\n'
        f'  python train.py --config=configs/moma.py:tiny --workdir=runs/{name} \\\n    '
        + ' \\\n    '.join(map(shlex.quote, out['overrides']))
        + f'\n  python eval.py --workdir=runs/{name}')
  if FLAGS.image_tokens_field and not FLAGS.image_vocab_size:
    print('(data.image_vocab_size above is the largest code + 1: set it to your image '
          "tokenizer's codebook size)")


if __name__ == '__main__':
  flags.mark_flags_as_required(['src', 'name'])
  app.run(main)
