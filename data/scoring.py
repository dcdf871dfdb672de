"""Exact scores of generated samples on the embedded datasets (mm_shapes, mm_scenes).

A sample is consistent when the dataset's generator could have produced it: its probability
under the generator (data/floor.py, with the dataset's `FloorModel`) is above zero. This is
exact, not a classifier's guess, and it allows for everything the generator leaves open
(jitter, unsaid colours and fills, renderings whose tokens coincide, the caption's wording):

  text to image   [BOS] caption [BOI] | codes [EOI] ...: P(image == codes | caption) > 0,
                  text first: the caption's completions (`caption_masses`, the posterior
                  over the scenes it describes), then `image_masses` of the image under them.
  image to caption  [BOS] [BOI] codes [EOI] | caption [EOS]: P(caption | image) > 0, image
                  first: the image's posterior (`image_masses` under the prior), then
                  `caption_masses` of the caption process given it.

A prompt the generator cannot produce (a caption it never writes, an image it never draws,
a malformed prompt) raises ValueError: it is the prompt that is wrong, not the sample. A
malformed generation (a non-text token in the caption, no EOS or EOI, too few or too many
image codes) scores False. Probabilities are products of the generator's choices in
float64, far above underflow, and an impossible one is an exact 0, so `> 0` is exact. A
call costs milliseconds once the floor model is built: take it from
`data.pipeline.floor_model(cfg)[0]`, which is cached.
"""

from __future__ import annotations

import numpy as np

from data import floor
from data import tokenizer as tok


def _caption_ok(caption: bytes) -> bool:
  return bool(caption) and floor.END not in caption


def _completions(caption: bytes, model) -> list:
  """The scenes `caption` describes (floor.caption_masses); ValueError if never written."""
  mass, completions = (floor.caption_masses(model.caption_prior, caption + floor.END)
                       if _caption_ok(caption) else (np.zeros(1), []))
  if mass[-1] <= 0:
    raise ValueError(f'the prompt caption {caption!r} is not one the generator writes')
  return completions


def image_consistent(caption: bytes, codes: np.ndarray, model) -> bool:
  """True iff the generator can draw exactly `codes` (image codes, no offset, raster order)
  for a scene `caption` describes. ValueError if the generator never writes `caption`."""
  completions = _completions(caption.encode() if isinstance(caption, str) else caption, model)
  codes = np.asarray(codes, np.int64).reshape(-1)
  n = model.num_patches
  if len(codes) != n or ((codes < 0) | (codes >= tok.MAX_IMAGE_CODES)).any():
    return False
  image, _ = floor.image_masses(model.image_given_caption(completions), codes, n)
  return bool(image[-1] > 0)


def _image_posterior(codes: np.ndarray, model):
  codes = np.asarray(codes, np.int64).reshape(-1)
  n = model.num_patches
  if len(codes) != n:
    raise ValueError(f'the prompt image has {len(codes)} codes, the dataset {n}')
  if ((codes < 0) | (codes >= tok.MAX_IMAGE_CODES)).any():
    raise ValueError('the prompt image holds a code outside the codebook')
  mass, posterior = floor.image_masses(model.image_prior(), codes, n)
  if mass[-1] <= 0:
    raise ValueError('the prompt image is not one the generator draws')
  return posterior


def caption_consistent(codes: np.ndarray, caption: bytes, model) -> bool:
  """True iff the generator can write `caption` for the image `codes` (no offset, raster
  order). ValueError if the generator never draws that image."""
  return _caption_given(_image_posterior(codes, model), caption, model)


def _caption_given(posterior, caption: bytes, model) -> bool:
  if isinstance(caption, str):
    caption = caption.encode()
  if not _caption_ok(caption):
    return False
  mass, _ = floor.caption_masses(model.caption_given_image(posterior), caption + floor.END)
  return bool(mass[-1] > 0)


def _text(tokens: np.ndarray) -> bytes | None:
  """Text tokens -> bytes; None if one is not a text token."""
  if ((tokens < tok.TEXT_OFFSET) | (tokens >= tok.TEXT_OFFSET + 256)).any():
    return None
  return (tokens - tok.TEXT_OFFSET).astype(np.uint8).tobytes()


def _first(tokens: np.ndarray, token: int) -> int | None:
  hits = np.nonzero(tokens == token)[0]
  return int(hits[0]) if hits.size else None


def score_sequence(tokens, model) -> tuple[str, bool]:
  """A whole sequence, prompt + generation (int ids, trailing PAD allowed) -> (direction,
  consistent), direction 'text_to_image' ([BOS] caption [BOI] codes [EOI] ..., what follows
  EOI ignored) or 'image_to_caption' ([BOS] [BOI] codes [EOI] caption [EOS] ..., what
  follows EOS ignored). The prompt is what comes before the first generated part: the
  caption up to BOI, or the image's num_patches codes; ValueError if it is malformed or
  impossible. In image_to_caption, the EOI after the codes may be prompt or generated:
  without it the sample scores False."""
  tokens = np.asarray(tokens, np.int64).reshape(-1)
  if len(tokens) < 2 or tokens[0] != tok.BOS:
    raise ValueError('a sequence to score starts with BOS and holds a prompt')
  n = model.num_patches
  if tokens[1] == tok.BOI:
    codes = tokens[2:2 + n]
    if len(codes) < n or (codes < tok.IMAGE_OFFSET).any():
      raise ValueError(f'the image-first prompt is [BOS] [BOI] and {n} image codes')
    posterior = _image_posterior(codes - tok.IMAGE_OFFSET, model)  # raises if impossible
    if len(tokens) <= 2 + n or tokens[2 + n] != tok.EOI:
      return 'image_to_caption', False
    rest = tokens[3 + n:]
    end = _first(rest, tok.EOS)
    caption = None if end is None else _text(rest[:end])
    return 'image_to_caption', caption is not None and _caption_given(posterior, caption, model)
  boi = _first(tokens, tok.BOI)
  caption = None if boi is None else _text(tokens[1:boi])
  if caption is None:
    raise ValueError('the text-first prompt is [BOS], caption bytes, [BOI]')
  image = tokens[boi + 1:]
  if not (len(image) > n and (image[:n] >= tok.IMAGE_OFFSET).all() and image[n] == tok.EOI):
    _completions(caption, model)  # a bad prompt raises all the same
    return 'text_to_image', False
  return 'text_to_image', image_consistent(caption, image[:n] - tok.IMAGE_OFFSET, model)
