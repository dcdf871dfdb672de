"""`mm_shapes`: a procedurally generated image-caption dataset, TF-free.

Each example is a 32x32 RGB image on a black background with one coloured
shape (10% of the time two, at non-adjacent positions) and a caption that
describes it, e.g. "a large red circle at the top left".

  kinds      square, circle, triangle, diamond, plus, ring
  colours    red, green, blue, yellow, magenta, cyan, white, orange; all
             distinct under the 2-bit-per-channel codebook of `tokenizer`
  sizes      small (8 px), large (14 px)
  positions  3x3 grid (top left ... bottom right), centres at 8/16/24 px,
             jittered by -1, 0 or +1 px per axis

Kind, colour, size and position determine the coarse (8x8 patch) image up to
the jitter, so image tokens are predictable from the caption and captions
from the image. Example i of a split comes from np.random.default_rng((s, i))
with s = 0 for train and 1 for test (disjoint streams), and records are stored
in generation order (no TFDS shuffling), so record i is `generate_example(
split, i)`. Besides `image`, `caption` and `label` (the first shape's kind),
records carry ClassLabels `color`, `size`, `position` of the first shape and
`num_shapes`, which tests use to check that captions determine images.

`prepare(data_dir)` writes train (20k) and test (1k) as array_record in a few
seconds; it is idempotent and guarded by a file lock.
"""

import fcntl
import io
import os

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
KINDS = ('square', 'circle', 'triangle', 'diamond', 'plus', 'ring')
COLORS = {
    'red': (255, 0, 0),
    'green': (0, 255, 0),
    'blue': (0, 0, 255),
    'yellow': (255, 255, 0),
    'magenta': (255, 0, 255),
    'cyan': (0, 255, 255),
    'white': (255, 255, 255),
    'orange': (255, 170, 0),
}
SIZES = {'small': 4, 'large': 7}  # half extent in pixels
POSITIONS = ('top left', 'top center', 'top right',
             'center left', 'center', 'center right',
             'bottom left', 'bottom center', 'bottom right')
CELL_CENTERS = (8, 16, 24)  # pixel coordinate of grid rows / columns
JITTER = 1  # max shift of a shape's centre, pixels
TWO_SHAPE_PROB = 0.1
SPLITS = {'train': (20_000, 0), 'test': (1_000, 1)}  # name: (size, seed)
TEMPLATES = (
    'a {size} {color} {kind} at the {pos}',
    'a {size} {color} {kind} in the {pos}',
    'there is a {size} {color} {kind} at the {pos}',
    'the {pos} has a {size} {color} {kind}',
)
SECOND = ' and a {size} {color} {kind} at the {pos}'

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5  # pixel centres


def shape_mask(kind: str, cy: float, cx: float, h: float) -> np.ndarray:
  """Boolean [32, 32] mask of a shape centred at (cy, cx), half extent h."""
  dy, dx = _YY - cy, _XX - cx
  ay, ax = np.abs(dy), np.abs(dx)
  r = np.sqrt(dy**2 + dx**2)
  if kind == 'square':
    return (ay <= h) & (ax <= h)
  if kind == 'circle':
    return r <= h
  if kind == 'triangle':  # apex up, base at the bottom
    return (dy <= h) & (ax <= (dy + h) / 2)
  if kind == 'diamond':
    return ay + ax <= h
  if kind == 'plus':
    w = h / 3
    return ((ax <= w) & (ay <= h)) | ((ay <= w) & (ax <= h))
  if kind == 'ring':
    return (r <= h) & (r >= h / 2)
  raise ValueError(f'unknown shape kind {kind!r}')


def _describe(template, kind, color, size, pos):
  return template.format(kind=kind, color=color, size=size,
                         pos=POSITIONS[pos])


def generate_example(split: str, index: int) -> dict:
  """Example `index` of `split`: image (uint8 [32,32,3]), caption, labels."""
  rng = np.random.default_rng((SPLITS[split][1], index))
  color_names, size_names = list(COLORS), list(SIZES)

  def draw_attrs(pos):
    return (int(rng.integers(len(KINDS))), int(rng.integers(len(COLORS))),
            int(rng.integers(len(SIZES))), pos)

  objects = [draw_attrs(int(rng.integers(len(POSITIONS))))]
  row, col = divmod(objects[0][3], 3)
  far = [p for p in range(len(POSITIONS))
         if max(abs(p // 3 - row), abs(p % 3 - col)) >= 2]
  if far and rng.random() < TWO_SHAPE_PROB:
    objects.append(draw_attrs(far[int(rng.integers(len(far)))]))

  image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  for kind, color, size, pos in objects:
    jy, jx = rng.integers(-JITTER, JITTER + 1, size=2)
    cy = CELL_CENTERS[pos // 3] + jy
    cx = CELL_CENTERS[pos % 3] + jx
    mask = shape_mask(KINDS[kind], cy, cx, SIZES[size_names[size]])
    image[mask] = COLORS[color_names[color]]

  template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
  names = [(KINDS[k], color_names[c], size_names[s], p)
           for k, c, s, p in objects]
  caption = _describe(template, *names[0])
  if len(names) > 1:
    caption += _describe(SECOND, *names[1])
  kind, color, size, pos = objects[0]
  return {
      'image': image,
      'caption': caption,
      'label': kind,
      'color': color,
      'size': size,
      'position': pos,
      'num_shapes': np.int32(len(objects)),
  }


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


class MmShapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes with captions (see module docstring)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  # TFDS 4.9.10 resolves `code_path` of builders inside a package through the
  # optional `importlib_resources` module, which is not installed; give it.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format='png'),
            'caption': tfds.features.Text(),
            'label': tfds.features.ClassLabel(names=KINDS),
            'color': tfds.features.ClassLabel(names=list(COLORS)),
            'size': tfds.features.ClassLabel(names=list(SIZES)),
            'position': tfds.features.ClassLabel(names=POSITIONS),
            'num_shapes': tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,  # record i == generate_example(split, i)
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    for i in range(SPLITS[split][0]):
      example = generate_example(split, i)
      example['image'] = _png(example['image'])
      yield i, example


def kind_prompts() -> tuple[str, ...]:
  """Every caption template with each size, colour and position filled in and '{}' left
  for the kind: zero-shot prompts for the `label` classes (configs/imp.py). Averaging a
  class's embedding over them marginalises the attributes a class name leaves open, as
  CLIP's prompt ensembling does."""
  return tuple(t.format(kind='{}', color=c, size=s, pos=p)
               for t in TEMPLATES for s in SIZES for c in COLORS for p in POSITIONS)


def prepare(data_dir: str) -> MmShapes:
  """Prepares mm_shapes under data_dir if needed; returns the builder.

  Safe to call from several processes at once: one prepares while the others
  wait on a lock file in data_dir, then find the data ready.
  """
  data_dir = os.path.expanduser(data_dir)
  builder = MmShapes(data_dir=data_dir)
  if builder.is_prepared():
    return builder
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, '.mm_shapes.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder = MmShapes(data_dir=data_dir)
      if not builder.is_prepared():
        builder.download_and_prepare(
            file_format='array_record',
            download_config=tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
            ),
        )
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return MmShapes(data_dir=data_dir)
