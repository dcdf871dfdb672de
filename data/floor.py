"""The exact Bayes floor of the embedded datasets: the lowest expected loss any model can reach.

A generated dataset is a known distribution over token sequences, so the Bayes-optimal
next-token probability of every eval token can be computed exactly: it is
P(prefix + token) / P(prefix), each P the total probability of the sequences that start
with that prefix. `sequence_floor(seq, model)` returns -log of it for every target of one
sequence; `training/evaluate.py` pools it over the same tokens as the loss (docs/floor.md).

The prefix probabilities are not summed over every sequence (mm_scenes has ~10^13); each
part of the format is computed in the form that keeps it exact and small:

  caption  `caption_masses(process, target)`: a caption process (a Python function that
           makes its choices through `ch.pick(probs, texts)` in the order the text is
           written) is searched depth first against the target bytes. A branch whose text
           leaves the target at byte d adds its probability to every prefix up to d and is
           not expanded further, so the search only follows what is consistent with the
           target. The branches that reach the end return what they decided (the objects the
           caption named), which is the posterior over scenes given the caption.
  image    `image_masses(hypotheses, codes)`: a scene hypothesis (a weight and, per object,
           the patches its pixels can reach - its region - with a distribution over its
           `Renderings` there) gives P(image prefix) as a product over objects, since
           objects never share a patch, times the indicator that every other revealed patch
           is background. The revealed part of a region is always a prefix of it in raster
           order. The sum over hypotheses is the prior (image first) or the posterior given
           the caption (text first); at the end of the image the matching renderings are the
           posterior over each object's attributes given the image.

`enumerate_paths` runs a generator program over every choice it can make (the brute force
the tests compare all of this with, on shrunk generators).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from data import tokenizer as tok

END = b'\x00'  # the end of a caption in a caption target (captions never hold NUL)


# ---------------------------------------------------------------------------
# Choices: sampling and brute-force enumeration of a generator program.


class Sampler:
  """A generator program's choices drawn from `rng` (the dataset's examples). A program
  may also write caption text (`pick(probs, texts)`, `emit`, `end`): it lands in `text`."""

  def __init__(self, rng: np.random.Generator):
    self.rng, self.text = rng, b''

  def integers(self, n: int) -> int:
    return int(self.rng.integers(n))

  def coin(self, p: float) -> bool:
    return bool(self.rng.random() < p)

  def integers_vec(self, low: int, high: int, size: int) -> tuple[int, ...]:
    return tuple(int(v) for v in self.rng.integers(low, high, size=size))

  def hidden(self, n: int) -> int:
    """A uniform choice the caption does not show (None in `caption_masses`)."""
    return self.integers(n)

  def pick(self, probs, texts=None) -> int:
    i = int(self.rng.choice(len(probs), p=np.asarray(probs, np.float64)))
    if texts is not None:
      self.emit(_option(texts, i))
    return i

  def emit(self, text: bytes) -> None:
    self.text += text

  def end(self) -> None:
    pass


def _option(texts, i: int) -> bytes:
  return texts.texts[i] if isinstance(texts, TextOptions) else texts[i]


class _Branch(Exception):
  pass


class _Replay(Sampler):
  """Replays `forced` choices, then branches at the next one (see `enumerate_paths`)."""

  def __init__(self, forced: tuple[int, ...], stack: list):
    super().__init__(None)
    self.forced, self.stack, self.depth, self.prob = forced, stack, 0, 1.0

  def _choose(self, probs) -> int:
    if self.depth < len(self.forced):
      i = self.forced[self.depth]
      self.depth += 1
      self.prob *= probs[i]
      return i
    for i in reversed(range(len(probs))):
      if probs[i] > 0:
        self.stack.append(self.forced + (i,))
    raise _Branch

  def integers(self, n: int) -> int:
    return self._choose([1.0 / n] * n)

  def coin(self, p: float) -> bool:
    return self._choose([1.0 - p, p]) == 1

  def integers_vec(self, low: int, high: int, size: int) -> tuple[int, ...]:
    return tuple(low + self.integers(high - low) for _ in range(size))

  def pick(self, probs, texts=None) -> int:
    i = self._choose([float(p) for p in probs])
    if texts is not None:
      self.emit(_option(texts, i))
    return i


def enumerate_paths(program: Callable[[Any], Any]) -> list[tuple[float, Any, bytes]]:
  """Every (probability, result, text written) of `program(chooser)` over all its paths.

  The program chooses as with a `Sampler`; it is re-run from the start for each path, so
  keep it small (tests)."""
  stack: list[tuple[int, ...]] = [()]
  out = []
  while stack:
    replay = _Replay(stack.pop(), stack)
    try:
      result = program(replay)
    except _Branch:
      continue
    out.append((replay.prob, result, replay.text))
  return out


class BruteForce:
  """The floor from the whole distribution {sequence: probability} (tests): the sequences
  sorted, so the mass of a prefix is a range sum found by bisection."""

  def __init__(self, sequences: dict[tuple[int, ...], float]):
    self.keys = sorted(sequences)
    self.cum = np.concatenate([[0.0], np.cumsum([sequences[k] for k in self.keys])])

  def mass(self, prefix: tuple[int, ...]) -> float:
    lo = bisect.bisect_left(self.keys, prefix)
    hi = bisect.bisect_left(self.keys, prefix + (1 << 62,))
    return float(self.cum[hi] - self.cum[lo])

  def floor(self, seq) -> np.ndarray:
    seq = tuple(int(t) for t in seq)
    mass = np.array([self.mass(seq[:t]) for t in range(1, len(seq) + 1)])
    return -np.log(mass[1:] / mass[:-1])


# ---------------------------------------------------------------------------
# Captions: prefix probabilities by a depth-first search pruned by the target.


class _Stop(Exception):
  pass


def _as_options(texts) -> tuple[np.ndarray, np.ndarray]:
  options = texts if isinstance(texts, TextOptions) else TextOptions(texts)
  return options.bytes_, options.lengths


class TextOptions:
  """The texts of a pick's options as one padded byte matrix (build once, pick often)."""

  def __init__(self, texts: Sequence[bytes]):
    self.texts = list(texts)
    self.lengths = np.array([len(t) for t in texts], np.int64)
    width = max(1, int(self.lengths.max(initial=0)))
    self.bytes_ = np.full((len(texts), width), 0xFF, np.uint8)  # 0xFF never in a caption
    for i, t in enumerate(texts):
      self.bytes_[i, :len(t)] = np.frombuffer(t, np.uint8)


class _Search:
  """The chooser of `caption_masses`: replays `forced`, then expands one choice point."""

  def __init__(self, target: np.ndarray, forced: tuple[int, ...], stack: list,
               diverge: np.ndarray):
    self.target, self.forced, self.stack, self.diverge = target, forced, stack, diverge
    self.depth, self.pos, self.prob = 0, 0, 1.0

  def _agree(self, text: np.ndarray, length: int) -> int:
    """How many bytes of `text` agree with the target from self.pos (capped at its end)."""
    rest = self.target[self.pos:self.pos + length]
    eq = text[:len(rest)] == rest
    return len(rest) if eq.all() else int(np.argmin(eq))

  def emit(self, text: bytes) -> None:
    if not text:
      return
    t = np.frombuffer(text, np.uint8)
    n = self._agree(t, len(t))
    if n < len(t):  # leaves the target here, or runs past its (truncated) end
      self.diverge[self.pos + n] += self.prob
      raise _Stop
    self.pos += len(t)

  def end(self) -> None:
    self.emit(END)

  def hidden(self, n: int) -> None:
    """What the caption does not show is not searched over (the image sums over it)."""
    del n

  def pick(self, probs, texts=None) -> int:
    """A choice with probabilities `probs`; option i writes texts[i] (bytes, or a
    TextOptions for many options) right away, or nothing when texts is None."""
    if self.depth < len(self.forced):
      i = self.forced[self.depth]
      self.depth += 1
      self.prob *= float(probs[i])
      if texts is not None:
        self.pos += int(_as_options(texts)[1][i])
      return i
    probs = np.asarray(probs, np.float64)
    live = probs > 0
    if texts is None:
      for i in reversed(np.nonzero(live)[0]):
        self.stack.append(self.forced + (int(i),))
      raise _Stop
    mat, lengths = _as_options(texts)
    rest = self.target[self.pos:]
    width = min(mat.shape[1], len(rest))
    eq = mat[:, :width] == rest[:width]
    agree = np.where(eq.all(1), width, np.argmin(eq, axis=1) if width else 0)
    full = agree >= np.minimum(lengths, len(rest))  # the whole text agrees, or the target ends
    past = full & (lengths > len(rest))  # agrees up to the target's end and runs past it
    stop = live & (~full | past)
    np.add.at(self.diverge, self.pos + agree[stop], self.prob * probs[stop])
    for i in reversed(np.nonzero(live & full & ~past)[0]):
      self.stack.append(self.forced + (int(i),))
    raise _Stop


def caption_masses(process: Callable[[Any], Any], target: bytes
                   ) -> tuple[np.ndarray, list[tuple[float, Any]]]:
  """-> (mass, completions): mass[t] = P(the caption starts with target[:t]), t = 0..len;
  completions = (probability, process result) of every path that wrote the whole target
  (which ends with END unless the sequence was cut inside the caption)."""
  target_arr = np.frombuffer(target, np.uint8)
  diverge = np.zeros(len(target) + 1)
  stack: list = [()]
  completions = []
  while stack:
    ch = _Search(target_arr, stack.pop(), stack, diverge)
    try:
      result = process(ch)
    except _Stop:
      continue
    if ch.pos != len(target):
      raise AssertionError('a caption process returned before writing END')
    diverge[len(target)] += ch.prob
    completions.append((ch.prob, result))
  return np.cumsum(diverge[::-1])[::-1], completions


# ---------------------------------------------------------------------------
# Images: prefix probabilities of a mixture of scene hypotheses.


@dataclasses.dataclass
class Renderings:
  """Every way one object can look on the patches its pixels can reach (its region)."""
  codes: np.ndarray  # [N, r] image code of each rendering on the region, in raster order
  probs: np.ndarray  # [N] prior probability of each rendering (sums to 1)
  attrs: dict[str, np.ndarray]  # name -> [N] attribute value of each rendering
  _sorted: tuple | None = dataclasses.field(default=None, init=False, repr=False)

  def prefix_masses(self, revealed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> ([j+1] prior mass of the renderings whose first j codes are revealed[:j], for
    j = 0..len(revealed); [N] which renderings match all of it). The rows sorted once, so
    each prefix is a range found by bisection (no pass over every rendering)."""
    if self._sorted is None:
      order = np.lexsort(self.codes.T[::-1])
      keys = (self.codes[order] + 1).astype(np.uint8)  # codes + 1: no NUL in the keys
      keys = keys.view(f'S{keys.shape[1]}').reshape(-1)
      self._sorted = (order, keys, np.concatenate([[0.0], np.cumsum(self.probs[order])]))
    order, keys, cum = self._sorted
    prefix = (np.asarray(revealed) + 1).astype(np.uint8).tobytes()
    lo, hi = np.zeros(len(revealed) + 1, np.int64), np.full(len(revealed) + 1, len(order))
    for j in range(1, len(revealed) + 1):
      lo[j] = np.searchsorted(keys, prefix[:j], side='left')
      hi[j] = np.searchsorted(keys, prefix[:j] + b'\xff', side='left')
    rows = np.zeros(len(order), bool)
    rows[order[lo[-1]:hi[-1]]] = True
    return cum[hi] - cum[lo], rows

  def where(self, **values) -> 'Renderings':
    """The renderings with these attribute values (None: any), probabilities renormalised."""
    keep = np.ones(len(self.probs), bool)
    for name, value in values.items():
      if value is not None:
        keep &= self.attrs[name] == value
    if not keep.any():
      raise ValueError(f'no rendering has {values}')
    probs = self.probs[keep]
    return Renderings(self.codes[keep], probs / probs.sum(),
                      {k: v[keep] for k, v in self.attrs.items()})


# One object of a scene hypothesis: (region [r] patch indices ascending, its renderings,
# row weights summing to 1); a hypothesis: (weight, [one per object]).
Slot = tuple[np.ndarray, Renderings, np.ndarray]
Hypothesis = tuple[float, list[Slot]]


def _region_masses(region: np.ndarray, table: Renderings, weights: np.ndarray,
                   codes: np.ndarray):
  """-> ([r'+1] masses of the first j revealed region patches, [N] weights of the rows
  matching all of them)."""
  revealed = int(np.searchsorted(region, len(codes)))
  if weights is table.probs:  # the prior: by bisection in the sorted renderings
    masses, rows = table.prefix_masses(codes[region[:revealed]])
    return masses, weights * rows
  match = table.codes[:, :revealed] == codes[region[:revealed]]
  alive = np.cumprod(match, axis=1, dtype=bool)
  masses = np.concatenate([[weights.sum()], weights @ alive])
  rows = alive[:, -1] if revealed else np.ones(len(weights), bool)
  return masses, weights * rows


def image_masses(hypotheses: Sequence[Hypothesis], codes: np.ndarray, num_patches: int):
  """-> (mass [len(codes)+1], posterior): mass[k] = P(the image starts with codes[:k]).

  posterior: per hypothesis (weight of the whole revealed prefix, [per object: row
  weights of the renderings that match it]) - unnormalised, for the caption that follows."""
  codes = np.asarray(codes)
  k = len(codes)
  steps = np.arange(k + 1)
  total = np.zeros(k + 1)
  posterior = []
  cache: dict = {}
  for weight, slots in hypotheses:
    f = np.full(k + 1, float(weight))
    covered = np.zeros(num_patches, bool)
    rows = []
    for region, table, w in slots:
      key = (id(region), id(table), id(w))
      if key not in cache:
        cache[key] = _region_masses(region, table, w, codes)
      masses, matching = cache[key]
      f *= masses[np.searchsorted(region, steps)]
      covered[region] = True
      rows.append(matching)
    bad = np.nonzero(~covered[:k] & (codes != 0))[0]
    if bad.size:
      f[bad[0] + 1:] = 0.0
    total += f
    posterior.append((f[-1], rows))
  return total, posterior


# ---------------------------------------------------------------------------
# Whole sequences.


def _log_ratio(mass: np.ndarray, what: str) -> np.ndarray:
  """-log(mass[t+1] / mass[t]) for every t; a zero means the data is not the generator's."""
  if (mass[1:] <= 0).any():
    t = int(np.argmax(mass[1:] <= 0))
    raise ValueError(f'{what}: token {t} has probability 0 under the generator (the '
                     'sequence is not one this dataset can produce)')
  return -np.log(mass[1:] / mass[:-1])


def sequence_floor(seq, model, p_image_first: float) -> np.ndarray:
  """Bayes-optimal -log p of seq[t+1] given seq[:t+1], for t = 0 .. len(seq) - 2.

  `seq` is [BOS] caption [BOI] image [EOI] [EOS] or [BOS] [BOI] image [EOI] caption [EOS],
  possibly cut short. `model` (a dataset's floor model) provides `num_patches`,
  `caption_prior(ch)`, `image_given_caption(completions)`, `image_prior()` and
  `caption_given_image(posterior)` (see data/shapes.py, data/scenes.py)."""
  seq = np.asarray(seq, np.int64)
  out = np.zeros(max(len(seq) - 1, 0))
  if len(seq) < 2:
    return out
  if seq[0] != tok.BOS:
    raise ValueError(f'a sequence starts with BOS, got {seq[0]}')
  n = model.num_patches
  image_first = seq[1] == tok.BOI
  p_order = p_image_first if image_first else 1.0 - p_image_first
  if p_order <= 0:
    raise ValueError('the sequence has an order the data config does not produce')
  if image_first:
    codes = _image_codes(seq[2:2 + n])
    mass, posterior = image_masses(model.image_prior(), codes, n)
    out[1:1 + len(codes)] = _log_ratio(mass, 'image')
    start = 3 + n  # the caption's first byte; EOI (seq[2 + n]) is certain
    caption, ended = _caption_bytes(seq[start:], tok.EOS)
    if start < len(seq):
      process = model.caption_given_image(posterior)
      mass, _ = caption_masses(process, caption + (END if ended else b''))
      out[start - 1:start - 1 + len(mass) - 1] = _log_ratio(mass, 'caption')
  else:
    caption, ended = _caption_bytes(seq[1:], tok.BOI)
    mass, completions = caption_masses(model.caption_prior, caption + (END if ended else b''))
    out[:len(mass) - 1] = _log_ratio(mass, 'caption')
    start = len(caption) + 2  # the first image code
    if ended and start < len(seq):
      codes = _image_codes(seq[start:start + n])
      mass, _ = image_masses(model.image_given_caption(completions), codes, n)
      out[start - 1:start - 1 + len(codes)] = _log_ratio(mass, 'image')
  out[0] -= math.log(p_order)
  return out


def _caption_bytes(tokens: np.ndarray, end_token: int) -> tuple[bytes, bool]:
  stop = np.nonzero(tokens == end_token)[0]
  ended = bool(stop.size)
  text = tokens[:stop[0]] if ended else tokens
  if ((text < tok.TEXT_OFFSET) | (text >= tok.TEXT_OFFSET + 256)).any():
    raise ValueError('a caption holds a non-text token')
  return (text - tok.TEXT_OFFSET).astype(np.uint8).tobytes(), ended


def _image_codes(tokens: np.ndarray) -> np.ndarray:
  if ((tokens < tok.IMAGE_OFFSET) | (tokens >= tok.IMAGE_OFFSET + tok.MAX_IMAGE_CODES)).any():
    raise ValueError('an image holds a non-image token')
  return tokens - tok.IMAGE_OFFSET


def floor_of_example(seq, seq_len: int, model, p_image_first: float) -> np.ndarray:
  """float32 [seq_len]: the floor of each target of `tok.to_example(seq, seq_len)` (0 on
  padding), for the eval pipeline."""
  seq = np.asarray(seq)[:seq_len + 1]
  out = np.zeros(seq_len, np.float32)
  f = sequence_floor(seq, model, p_image_first)
  out[:len(f)] = f
  return out

