"""`mm_shapes`: a procedurally generated image-caption dataset, TF-free.

Each example is a 32x32 RGB image on a black background with one coloured
shape (10% of the time two, at non-adjacent positions) and a caption that
describes it, e.g. "a large red circle at the top left".

  kinds      square, circle, triangle, diamond, plus, ring
  colours    red, green, blue, yellow, magenta, cyan, white, orange: distinct as
             full-patch colours under the 'rgb64' codebook of `tokenizer`
  sizes      small (8 px), large (14 px)
  positions  3x3 grid (top left ... bottom right), centres at 8/16/24 px,
             jittered by -1, 0 or +1 px per axis

Kind, colour, size and position determine the coarse (4x4 px patch) image up to the jitter,
and the tokens tell size and position apart always, but not always kind or colour: a patch
code is a mean colour, so a patch a shape covers partly reads as a darker colour. Of the
one-shape renderings (every kind, colour, size, position and jitter), 16.6% have exactly the
tokens of a rendering of another kind or colour: 32.6% of small shapes (small diamond vs
plus, circle vs ring, diamond vs ring, ...; and yellow vs orange for thin small shapes),
0.5% of large ones (tests/test_floor.py counts them). The exact floor (`FloorModel`,
data/floor.py) accounts for every such ambiguity.

Example i of a split comes from np.random.default_rng((s, i))
with s = 0 for train and 1 for test (disjoint streams), and records are stored
in generation order (no TFDS shuffling), so record i is `generate_example(
split, i)`. Besides `image`, `caption` and `label` (the first shape's kind),
records carry ClassLabels `color`, `size`, `position` of the first shape and
`num_shapes`. The longest sequence ([BOS] caption [BOI] 64 codes [EOI] [EOS], two shapes)
has 172 tokens; configs/common.py gives tiny and small a seq_len that holds it.

`prepare(data_dir)` writes train (20k) and test (1k) as array_record in a few
seconds; it is idempotent and guarded by a file lock.
"""

import dataclasses
import fcntl
import io
import itertools
import os

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from data import floor
from data import tokenizer as tok

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


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
  """What the generator draws from. The default is the dataset; tests shrink it to enumerate
  every sequence (data/floor.py)."""
  kinds: tuple[str, ...] = KINDS
  colors: tuple[str, ...] = tuple(COLORS)
  sizes: tuple[str, ...] = tuple(SIZES)
  jitter: int = JITTER
  two_shape_prob: float = TWO_SHAPE_PROB
  templates: tuple[str, ...] = TEMPLATES


SPEC = ShapesSpec()


def far_positions(pos: int) -> list[int]:
  """Where a second shape may go: at least two grid steps from `pos` (none from the
  centre), so the two shapes' pixels never share a patch."""
  row, col = divmod(pos, 3)
  return [p for p in range(len(POSITIONS))
          if max(abs(p // 3 - row), abs(p % 3 - col)) >= 2]


def draw_scene(ch, spec: ShapesSpec = SPEC):
  """-> (objects [(kind, colour, size, pos)], jitters [(jy, jx)], template index), drawn
  through the chooser `ch` (data/floor.py: a Sampler, or every path for the floor tests)."""
  def draw_attrs(pos):
    return (ch.integers(len(spec.kinds)), ch.integers(len(spec.colors)),
            ch.integers(len(spec.sizes)), pos)

  objects = [draw_attrs(ch.integers(len(POSITIONS)))]
  far = far_positions(objects[0][3])
  if far and ch.coin(spec.two_shape_prob):
    objects.append(draw_attrs(far[ch.integers(len(far))]))
  jitters = [ch.integers_vec(-spec.jitter, spec.jitter + 1, 2) for _ in objects]
  return objects, jitters, ch.integers(len(spec.templates))


def object_mask(kind: str, size: str, pos: int, jitter) -> np.ndarray:
  jy, jx = jitter
  return shape_mask(kind, CELL_CENTERS[pos // 3] + jy, CELL_CENTERS[pos % 3] + jx,
                    SIZES[size])


def render(objects, jitters, spec: ShapesSpec = SPEC) -> np.ndarray:
  image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  for (kind, color, size, pos), jitter in zip(objects, jitters):
    mask = object_mask(spec.kinds[kind], spec.sizes[size], pos, jitter)
    image[mask] = COLORS[spec.colors[color]]
  return image


def describe(template: str, obj, spec: ShapesSpec = SPEC) -> str:
  kind, color, size, pos = obj
  return template.format(kind=spec.kinds[kind], color=spec.colors[color],
                         size=spec.sizes[size], pos=POSITIONS[pos])


def caption_of(objects, template: int, spec: ShapesSpec = SPEC) -> str:
  caption = describe(spec.templates[template], objects[0], spec)
  if len(objects) > 1:
    caption += describe(SECOND, objects[1], spec)
  return caption


def generate_example(split: str, index: int, spec: ShapesSpec = SPEC) -> dict:
  """Example `index` of `split`: image (uint8 [32,32,3]), caption, labels."""
  rng = np.random.default_rng((SPLITS[split][1], index))
  objects, jitters, template = draw_scene(floor.Sampler(rng), spec)
  kind, color, size, pos = objects[0]
  return {
      'image': render(objects, jitters, spec),
      'caption': caption_of(objects, template, spec),
      'label': kind,
      'color': color,
      'size': size,
      'position': pos,
      'num_shapes': np.int32(len(objects)),
  }


class FloorModel:
  """mm_shapes as data/floor.py needs it: the caption process and the image hypotheses,
  for `spec` tokenised at `patch_size` with `codebook` (32 x 32 images, no resizing)."""

  def __init__(self, spec: ShapesSpec, patch_size: int, codebook: str):
    self.spec = spec
    self.num_patches = (IMAGE_SIZE // patch_size) ** 2
    sizes = (len(spec.kinds), len(spec.colors), len(spec.sizes))
    self.attrs = list(itertools.product(*map(range, sizes)))  # (kind, colour, size)
    self.regions, self.tables = zip(*[self._slot_table(pos, patch_size, codebook)
                                      for pos in range(9)])
    for pos in range(9):
      for q in far_positions(pos):  # two shapes never share a patch (floor.image_masses)
        assert not np.intersect1d(self.regions[pos], self.regions[q]).size
    self.objects = [a + (pos,) for pos in range(9) for a in self.attrs]  # first shape
    self.first = [floor.TextOptions([describe(t, o, spec).encode() for o in self.objects])
                  for t in spec.templates]
    self.second = [floor.TextOptions([describe(SECOND, a + (q,), spec).encode()
                                      for a in self.attrs]) for q in range(9)]
    self._prior: list[floor.Hypothesis] = []
    self.positions: list[list[int]] = []

  def _slot_table(self, pos, patch_size, codebook):
    """-> (region, renderings) of one shape at `pos`: every kind, colour, size, jitter."""
    spec, j = self.spec, range(-self.spec.jitter, self.spec.jitter + 1)
    rows = list(itertools.product(range(len(spec.kinds)), range(len(spec.colors)),
                                  range(len(spec.sizes)), j, j))
    masks = np.stack([object_mask(spec.kinds[k], spec.sizes[s], pos, (jy, jx))
                      for k, _, s, jy, jx in rows])
    rgb = np.array([COLORS[spec.colors[c]] for _, c, _, _, _ in rows], np.uint8)
    codes = tok.encode_images(masks[..., None] * rgb[:, None, None, :], patch_size, codebook)
    g = IMAGE_SIZE // patch_size
    touched = masks.reshape(len(rows), g, patch_size, g, patch_size).any(axis=(0, 2, 4))
    region = np.nonzero(touched.reshape(-1))[0]
    attrs = np.array(rows)
    return region, floor.Renderings(
        codes[:, region], np.full(len(rows), 1.0 / len(rows)),
        {'kind': attrs[:, 0], 'color': attrs[:, 1], 'size': attrs[:, 2]})

  def caption_prior(self, ch):
    """The caption written left to right: template, first shape, whether a second one."""
    spec = self.spec
    t = ch.pick(_uniform(len(spec.templates)))
    first = self.objects[ch.pick(_uniform(len(self.objects)), self.first[t])]
    chosen = [first]
    far = far_positions(first[3])
    p2 = spec.two_shape_prob if far else 0.0
    if ch.pick([1.0 - p2, p2]):
      q = far[ch.pick(_uniform(len(far)))]
      chosen.append(self.attrs[ch.pick(_uniform(len(self.attrs)), self.second[q])] + (q,))
    ch.end()
    return chosen

  def image_given_caption(self, completions) -> list[floor.Hypothesis]:
    out = []
    for p, objects in completions:
      slots = []
      for k, c, s, pos in objects:
        table = self.tables[pos].where(kind=k, color=c, size=s)
        slots.append((self.regions[pos], table, table.probs))
      out.append((p, slots))
    return out

  def image_prior(self) -> list[floor.Hypothesis]:
    """Which shapes are where, (weight, slots) each; `self.positions` says where."""
    if not self._prior:
      p2 = self.spec.two_shape_prob
      for pos in range(9):
        far = far_positions(pos)
        for weight, where in [((1 - (p2 if far else 0.0)) / 9, [pos])] + [
            (p2 / 9 / len(far), [pos, q]) for q in far]:
          self._prior.append((weight, [(self.regions[i], self.tables[i], self.tables[i].probs)
                                       for i in where]))
          self.positions.append(where)
    return self._prior

  def _attr_posterior(self, table: floor.Renderings, rows: np.ndarray) -> np.ndarray:
    """Row weights -> posterior over self.attrs (kind, colour, size)."""
    index = np.ravel_multi_index((table.attrs['kind'], table.attrs['color'],
                                  table.attrs['size']),
                                 (len(self.spec.kinds), len(self.spec.colors),
                                  len(self.spec.sizes)))
    w = np.bincount(index, weights=rows, minlength=len(self.attrs))
    return w / w.sum()

  def caption_given_image(self, posterior):
    """The caption process given the whole image: `floor.image_masses`' posterior over
    which shapes are where (aligned with `image_prior()`), then the caption's choices."""
    spec, hyps = self.spec, []
    for (weight, rows), (_, slots), where in zip(posterior, self.image_prior(),
                                                 self.positions):
      if weight > 0:
        hyps.append((weight, where, [self._attr_posterior(table, r)
                                     for (_, table, _), r in zip(slots, rows)]))
    weights = np.array([w for w, _, _ in hyps])
    n = len(self.attrs)

    def process(ch):
      t = ch.pick(_uniform(len(spec.templates)))
      _, where, attrs = hyps[ch.pick(weights / weights.sum())]
      probs = np.zeros(len(self.objects))
      probs[where[0] * n:(where[0] + 1) * n] = attrs[0]
      ch.pick(probs, self.first[t])
      if len(where) > 1:
        ch.pick(attrs[1], self.second[where[1]])
      ch.end()

    return process


def _uniform(n: int) -> np.ndarray:
  return np.full(n, 1.0 / n)


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
