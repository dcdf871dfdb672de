"""`mm_scenes`: a generated image-caption dataset built to be capacity-limited, TF-free.

A scene is a G x G grid of 12 x 12 px cells (G = 3: a 36 x 36 image, 81 tokens at 4 px
patches) holding 1-3 objects in distinct cells. An object is one of K kinds, in one of 12
colours (tokenizer.PALETTE) and 3 fills, jittered by 0-2 px per axis inside its cell:

  kinds    the 6 shapes (square, circle, triangle, diamond, plus, ring) and K - 6 glyphs:
           seeded random 5 x 5 bitmaps (2 px blocks), each named by a seeded pseudo-word
           ('bado', 'kefu', ...). K is the knowledge knob (variants k8, k32, k128, k512):
           the image side must memorise the bitmaps, the text side the names.
  fills    solid, hollow (a 1 px outline), striped (2 px rows)

The caption describes the objects in the order they were drawn, which is a uniformly random
order: "two: red striped kefu top left, hollow square left of kefu". Each part is drawn as it
is written: the count ("two: ") half of the time; per object its colour (3/4 of the time)
and fill (1/2), its name, and its place - the first object's absolutely ("top left"), a later
one's half of the time relative to an earlier object ("left of kefu", "above square":
uniform over the true relations). So a caption leaves colours, fills, jitter and sometimes
cells open, and an image leaves the order, the wording and what is said open.

Tokens use the 'palette' codebook (tokenizer): a patch's colour and which of its quadrants
are covered, so kind and fill show. Two renderings can still share tokens (a hollow and a
solid kind whose outline fills the same quadrants); the exact floor (data/floor.py,
`FloorModel`) counts every such ambiguity.

Splits: example i of a split comes from np.random.default_rng((seed, i)); 'train' (seed 0)
is a stream of 2**40 examples read in order, never repeated (no memorisation), 'test'
(seed 1) the first 10,000 examples of its own stream. Nothing is written to disk.
Variants: 'mm_scenes' (= g3_k32) or 'mm_scenes/g{G}_k{K}', G in 2..4, K in 6..4096.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re

import numpy as np

from data import floor
from data import tokenizer as tok

NAME = 'mm_scenes'
CELL_PX = 12  # cell side in pixels (3 x 3 patches of 4 px)
BLOCKS = 5  # kinds are BLOCKS x BLOCKS bitmaps of 2 x 2 px blocks: 10 x 10 px
OFFSETS = 3  # jitter: the object's top-left corner at 0, 1 or 2 px in its cell, per axis
SPLITS = {'train': (2 ** 40, 0), 'test': (10_000, 1)}  # name: (size, seed)
FILLS = ('solid', 'hollow', 'striped')
COUNT_WORDS = ('one', 'two', 'three')
RELATIONS = ('left of', 'right of', 'above', 'below')
ROWS = {2: ('top', 'bottom'), 3: ('top', 'middle', 'bottom'),
        4: ('top', 'upper', 'lower', 'bottom')}
COLS = {2: ('left', 'right'), 3: ('left', 'center', 'right'),
        4: ('left', 'midleft', 'midright', 'right')}
SHAPES = {  # the named kinds, as BLOCKS x BLOCKS bitmaps
    'square': '##### ##### ##### ##### #####',
    'circle': '.###. ##### ##### ##### .###.',
    'triangle': '..#.. ..#.. .###. .###. #####',
    'diamond': '..#.. .###. ##### .###. ..#..',
    'plus': '..#.. ..#.. ##### ..#.. ..#..',
    'ring': '.###. #...# #...# #...# .###.',
}
_GLYPH_SEED = 2026  # glyph bitmaps and names: fixed, nested across K


@dataclasses.dataclass(frozen=True)
class ScenesSpec:
  """What the generator draws from (the variant name sets grid and kinds; tests shrink the
  rest to enumerate every sequence)."""
  grid: int = 3  # G: cells per side
  kinds: int = 32  # K: the 6 shapes, then glyphs
  colors: tuple[str, ...] = tuple(tok.PALETTE)
  fills: tuple[str, ...] = FILLS
  count_probs: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)  # P(1, 2, 3 objects)
  offsets: int = OFFSETS
  p_count: float = 0.5  # the caption starts with the count
  p_color: float = 0.75  # an object's colour is said
  p_fill: float = 0.5  # its fill is said
  p_relative: float = 0.5  # a later object's place is said relative to an earlier one

  @property
  def image_size(self) -> int:
    return self.grid * CELL_PX


def parse_name(name: str) -> ScenesSpec:
  """'mm_scenes' or 'mm_scenes/g3_k128' -> its spec; anything else raises ValueError."""
  if name == NAME:
    return ScenesSpec()
  m = re.fullmatch(NAME + r'/g(\d+)_k(\d+)', name)
  if not m or int(m[1]) not in ROWS or not 6 <= int(m[2]) <= 4096:
    raise ValueError(f'data.tfds_name={name!r}: mm_scenes variants are mm_scenes or '
                     f'mm_scenes/g<G>_k<K> with G in {sorted(ROWS)} and K in 6..4096')
  return ScenesSpec(grid=int(m[1]), kinds=int(m[2]))


# ---------------------------------------------------------------------------
# Kinds: bitmaps and names.


def _bitmap(rows: str) -> np.ndarray:
  return np.array([[c == '#' for c in r] for r in rows.split()], bool)


def _renders_everywhere(bits: np.ndarray) -> bool:
  """Every fill and offset of the kind covers at least one quadrant (else an object could
  look like an empty cell)."""
  codes = tok.encode_images(np.stack([_cell_image(bits, f, divmod(o, OFFSETS), (255, 255, 255))
                                      for f in FILLS for o in range(OFFSETS ** 2)]),
                            4, 'palette')
  return bool((codes > 0).any(axis=1).all())


@functools.cache
def kinds(k: int) -> tuple[tuple[str, ...], np.ndarray]:
  """(names, [k, BLOCKS, BLOCKS] bitmaps) of the first k kinds: the shapes, then glyphs."""
  names, bitmaps = list(SHAPES), [_bitmap(b) for b in SHAPES.values()]
  rng = np.random.default_rng(_GLYPH_SEED)
  consonants, vowels = 'bdfgklmnprstvz', 'aeiou'
  syllables = [c + v for c in consonants for v in vowels]
  words = [a + b for a in syllables for b in syllables]
  words = [words[i] for i in rng.permutation(len(words))]
  taken = set(_caption_words())
  seen = {b.tobytes() for b in bitmaps}
  while len(names) < k:
    bits = rng.random((BLOCKS, BLOCKS)) < 0.5
    if bits.sum() < 9 or bits.tobytes() in seen or not _renders_everywhere(bits):
      continue
    while words[0] in taken:
      words.pop(0)
    names.append(words.pop(0))
    bitmaps.append(bits)
    seen.add(bits.tobytes())
  return tuple(names[:k]), np.stack(bitmaps[:k])


def _caption_words() -> list[str]:
  words = list(tok.PALETTE) + list(FILLS) + list(COUNT_WORDS) + list(SHAPES)
  words += [w for r in RELATIONS for w in r.split()]
  words += [w for table in (ROWS, COLS) for names in table.values() for w in names]
  return words


def cell_names(grid: int) -> list[str]:
  return [f'{r} {c}' for r in ROWS[grid] for c in COLS[grid]]


def relations(cell: int, ref: int, grid: int) -> list[int]:
  """Indices into RELATIONS true of `cell` relative to `ref` (never empty for two cells)."""
  (r, c), (rr, rc) = divmod(cell, grid), divmod(ref, grid)
  return [i for i, ok in enumerate((c < rc, c > rc, r < rr, r > rr)) if ok]


# ---------------------------------------------------------------------------
# Drawing.


def _fill_mask(bits: np.ndarray, fill: str) -> np.ndarray:
  """A kind's 10 x 10 px mask in one of FILLS."""
  mask = np.repeat(np.repeat(bits, 2, axis=0), 2, axis=1)
  if fill == 'hollow':
    padded = np.pad(mask, 1)
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    mask = mask & ~inner
  elif fill == 'striped':
    mask = mask & ((np.arange(2 * BLOCKS) // 2) % 2 == 0)[:, None]
  return mask


def _cell_image(bits: np.ndarray, fill: str, offset: tuple[int, int], rgb) -> np.ndarray:
  """One object drawn in an empty CELL_PX x CELL_PX cell, top-left corner at (oy, ox)."""
  oy, ox = offset
  cell = np.zeros((CELL_PX, CELL_PX, 3), np.uint8)
  side = 2 * BLOCKS
  cell[oy:oy + side, ox:ox + side][_fill_mask(bits, fill)] = rgb
  return cell


@dataclasses.dataclass(frozen=True)
class Obj:
  cell: int
  kind: int
  color: int | None  # None: not said (the caption search leaves it open)
  fill: int | None
  offset: int | None


def _uniform(n: int) -> np.ndarray:
  return np.full(n, 1.0 / n)


class Captions:
  """The texts the caption program picks from, built once per spec."""

  def __init__(self, spec: ScenesSpec):
    self.spec = spec
    self.names = [n.encode() for n in kinds(spec.kinds)[0]]
    cells = cell_names(spec.grid)
    self.cells = [c.encode() for c in cells]
    self.color = floor.TextOptions([b''] + [f'{c} '.encode() for c in spec.colors])
    self.color_probs = np.concatenate([[1 - spec.p_color],
                                       np.full(len(spec.colors), spec.p_color / len(spec.colors))])
    self.fill = floor.TextOptions([b''] + [f'{f} '.encode() for f in spec.fills])
    self.fill_probs = np.concatenate([[1 - spec.p_fill],
                                      np.full(len(spec.fills), spec.p_fill / len(spec.fills))])
    self.kind = floor.TextOptions([n + b' ' for n in self.names])

  def count(self, ch, n: int) -> None:
    ch.pick([1 - self.spec.p_count, self.spec.p_count],
            [b'', COUNT_WORDS[n - 1].encode() + b': '])

  def relative(self, ch, cell: int, placed: list[Obj]) -> None:
    """Say `cell` relative to one of the objects `placed` before it."""
    ref = placed[ch.pick(_uniform(len(placed)))]
    rels = relations(cell, ref.cell, self.spec.grid)
    ch.pick(_uniform(len(rels)),
            [RELATIONS[r].encode() + b' ' + self.names[ref.kind] for r in rels])


def draw_scene(ch, spec: ScenesSpec, captions: Captions | None = None) -> list[Obj]:
  """The generator: a scene and its caption, each choice made where the caption writes it
  (so with floor.caption_masses' chooser this is also the text-first caption process)."""
  cap = captions or _captions(spec)
  n = 1 + ch.pick(spec.count_probs)
  cap.count(ch, n)
  placed: list[Obj] = []
  for j in range(n):
    if j:
      ch.emit(b', ')
    c = ch.pick(cap.color_probs, cap.color)
    color = c - 1 if c else ch.hidden(len(spec.colors))
    f = ch.pick(cap.fill_probs, cap.fill)
    fill = f - 1 if f else ch.hidden(len(spec.fills))
    kind = ch.pick(_uniform(spec.kinds), cap.kind)
    free = [c for c in range(spec.grid ** 2) if c not in {o.cell for o in placed}]
    if j and ch.pick([1 - spec.p_relative, spec.p_relative]):
      cell = free[ch.pick(_uniform(len(free)))]
      cap.relative(ch, cell, placed)
    else:
      cell = free[ch.pick(_uniform(len(free)), [cap.cells[c] for c in free])]
    placed.append(Obj(cell, kind, color, fill, ch.hidden(spec.offsets ** 2)))
  ch.end()
  return placed


@functools.cache
def _captions(spec: ScenesSpec) -> Captions:
  return Captions(spec)


def render(objects: list[Obj], spec: ScenesSpec) -> np.ndarray:
  bitmaps = kinds(spec.kinds)[1]
  image = np.zeros((spec.image_size, spec.image_size, 3), np.uint8)
  for o in objects:
    r, c = divmod(o.cell, spec.grid)
    image[r * CELL_PX:(r + 1) * CELL_PX, c * CELL_PX:(c + 1) * CELL_PX] = _cell_image(
        bitmaps[o.kind], spec.fills[o.fill], divmod(o.offset, spec.offsets),
        tok.PALETTE[spec.colors[o.color]])
  return image


def generate_example(split: str, index: int, spec: ScenesSpec = ScenesSpec()) -> dict:
  """Example `index` of `split`: {'image': uint8 [S, S, 3], 'caption': str}."""
  if not 0 <= index < SPLITS[split][0]:
    raise IndexError(f'{split} has {SPLITS[split][0]} examples, asked for {index}')
  ch = floor.Sampler(np.random.default_rng((SPLITS[split][1], index)))
  objects = draw_scene(ch, spec)
  return {'image': render(objects, spec), 'caption': ch.text.decode()}


def max_sequence_length(spec: ScenesSpec) -> int:
  """The longest [BOS] caption [BOI] image [EOI] [EOS] any example can have."""
  names = kinds(spec.kinds)[0]
  longest = lambda words: max(map(len, words))  # noqa: E731
  place = max(longest(cell_names(spec.grid)),
              longest(RELATIONS) + 1 + longest(names))
  phrase = (longest(spec.colors) + 1 + longest(spec.fills) + 1 + longest(names) + 1 + place)
  n = len(spec.count_probs)
  caption = len(COUNT_WORDS[n - 1]) + 2 + n * phrase + 2 * (n - 1)
  return caption + (spec.image_size // 4) ** 2 + 4


class Source:
  """A split as a random-access source (len, [i] -> record), as Grain reads TFDS."""

  def __init__(self, spec: ScenesSpec, split: str):
    self.spec, self.split = spec, split

  def __len__(self) -> int:
    return SPLITS[self.split][0]

  def __getitem__(self, index: int) -> dict:
    return generate_example(self.split, int(index), self.spec)


# ---------------------------------------------------------------------------
# The exact floor (data/floor.py).


class FloorModel:
  """mm_scenes as data/floor.py needs it, tokenised at `patch_size` with `codebook`."""

  def __init__(self, spec: ScenesSpec, patch_size: int, codebook: str):
    if CELL_PX % patch_size:
      raise ValueError(f'patch_size={patch_size} does not divide the {CELL_PX} px cells')
    self.spec, self.captions = spec, _captions(spec)
    per, g = CELL_PX // patch_size, spec.image_size // patch_size
    self.num_patches = g * g
    self.regions = []
    for cell in range(spec.grid ** 2):
      r, c = divmod(cell, spec.grid)
      rows, cols = np.meshgrid(np.arange(r * per, (r + 1) * per),
                               np.arange(c * per, (c + 1) * per), indexing='ij')
      self.regions.append((rows * g + cols).reshape(-1))
    bitmaps = kinds(spec.kinds)[1]
    grid = list(itertools.product(range(spec.kinds), range(len(spec.colors)),
                                  range(len(spec.fills)), range(spec.offsets ** 2)))
    images = np.stack([_cell_image(bitmaps[k], spec.fills[f], divmod(o, spec.offsets),
                                   tok.PALETTE[spec.colors[c]]) for k, c, f, o in grid])
    attrs = np.array(grid)
    self.table = floor.Renderings(
        tok.encode_images(images, patch_size, codebook), _uniform(len(grid)),
        {'kind': attrs[:, 0], 'color': attrs[:, 1], 'fill': attrs[:, 2]})
    self._where: dict = {}
    self.occupancy = []  # image_prior()'s hypotheses: (weight, cells)
    for n, p in enumerate(spec.count_probs, start=1):
      for cells in itertools.combinations(range(spec.grid ** 2), n):
        self.occupancy.append((p / math.comb(spec.grid ** 2, n), cells))
    self._prior = [(w, [(self.regions[c], self.table, self.table.probs) for c in cells])
                   for w, cells in self.occupancy]

  def caption_prior(self, ch):
    return draw_scene(ch, self.spec, self.captions)

  def _restricted(self, o: Obj) -> floor.Renderings:
    key = (o.kind, o.color, o.fill)
    if key not in self._where:
      self._where[key] = self.table.where(kind=o.kind, color=o.color, fill=o.fill)
    return self._where[key]

  def image_given_caption(self, completions) -> list[floor.Hypothesis]:
    out = []
    for p, objects in completions:
      tables = [self._restricted(o) for o in objects]
      out.append((p, [(self.regions[o.cell], t, t.probs) for o, t in zip(objects, tables)]))
    return out

  def image_prior(self) -> list[floor.Hypothesis]:
    return self._prior

  def caption_given_image(self, posterior):
    """The caption process given the whole image: which cells hold objects (weights from
    `floor.image_masses`, aligned with image_prior()), then per cell what it holds."""
    spec, cap, table = self.spec, self.captions, self.table
    hyps = []
    for (weight, rows), (_, cells) in zip(posterior, self.occupancy):
      if weight > 0:
        options = []
        for r in rows:
          nz = np.nonzero(r)[0]
          keys = np.stack([table.attrs['kind'][nz], table.attrs['color'][nz],
                           table.attrs['fill'][nz]], 1)
          uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
          w = np.bincount(inverse.reshape(-1), weights=r[nz])
          options.append((uniq, w / w.sum()))
        hyps.append((weight, cells, options))
    weights = np.array([w for w, _, _ in hyps])

    def process(ch):
      _, cells, options = hyps[ch.pick(weights / weights.sum())]
      cap.count(ch, len(cells))
      remaining, placed = list(range(len(cells))), []
      for j in range(len(cells)):
        if j:
          ch.emit(b', ')
        i = remaining.pop(ch.pick(_uniform(len(remaining))))
        uniq, w = options[i]
        kind, color, fill = uniq[ch.pick(w)]
        ch.pick([1 - spec.p_color, spec.p_color], [b'', f'{spec.colors[color]} '.encode()])
        ch.pick([1 - spec.p_fill, spec.p_fill], [b'', f'{spec.fills[fill]} '.encode()])
        ch.emit(cap.names[kind] + b' ')
        if j and ch.pick([1 - spec.p_relative, spec.p_relative]):
          cap.relative(ch, cells[i], placed)
        else:
          ch.emit(cap.cells[cells[i]])
        placed.append(Obj(cells[i], int(kind), None, None, None))
      ch.end()

    return process
