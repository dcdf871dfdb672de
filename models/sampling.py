"""Next-token sampling for the early-fusion decoder: temperature, top-k, top-p, grammar.

    logits [B, V] -> mask (Grammar.allowed) -> / temperature -> top-k -> top-p -> draw

`Sampling` is a static (hashable) config; temperature 0 is greedy argmax. `filter_logits`
sets every excluded token to -inf; ties are broken toward the LOWER token id in both
top-k and top-p (one stable sort on -logits), so a numpy reference matches exactly.

`Grammar` keeps samples in the token format of data/tokenizer.py,

    [BOS] text [BOI] image [EOI] ... [EOS], then PAD,

with one int32 state per row: OUTSIDE (-1) outside an image (allowed: text bytes, BOI,
EOS), c in 0..num_image_tokens inside an image after c codes (allowed: image codes while
c < num_image_tokens, then EOI only), FINISHED (-2) after EOS (allowed: PAD only, for
good). Everything is jnp, shapes are static and there is no Python control flow on traced
values, so it all runs under jit and inside lax.scan:

    state = grammar.prompt_state(prompt_BP, lengths_B)
    token = sample(rng, logits_BV, cfg, grammar.allowed(state, V))
    state = grammar.advance(state, token)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from data import tokenizer

OUTSIDE = -1  # grammar state: outside an image
FINISHED = -2  # grammar state: EOS emitted; only PAD follows


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn. temperature 0.0 = greedy argmax; top_k 0 = off;
  top_p 1.0 = off (nucleus: the smallest most-likely set with probability >= top_p)."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def check(self) -> None:
    if not self.temperature >= 0:
      raise ValueError(f'sampling.temperature={self.temperature} must be >= 0 (0 = greedy)')
    if self.top_k < 0:
      raise ValueError(f'sampling.top_k={self.top_k} must be >= 0 (0 = off)')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'sampling.top_p={self.top_p} must be in (0, 1] (1 = off)')

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class Grammar:
  """The sequence format as a per-row state machine (see the module docstring): each
  image is exactly num_image_tokens codes from [IMAGE_OFFSET, IMAGE_OFFSET + num_image_codes)."""
  num_image_tokens: int
  num_image_codes: int

  def __post_init__(self):
    if self.num_image_tokens < 1:
      raise ValueError(f'grammar.num_image_tokens={self.num_image_tokens} must be >= 1')
    if self.num_image_codes < 1:
      raise ValueError(f'grammar.num_image_codes={self.num_image_codes} must be >= 1')

  def _is_code(self, ids: jax.Array) -> jax.Array:
    return (ids >= tokenizer.IMAGE_OFFSET) & (
        ids < tokenizer.IMAGE_OFFSET + self.num_image_codes)

  def allowed(self, state: jax.Array, vocab_size: int) -> jax.Array:
    """bool [B, V]: the tokens the format allows next, given int32 state [B]."""
    if tokenizer.IMAGE_OFFSET + self.num_image_codes > vocab_size:
      raise ValueError(f'vocab_size={vocab_size} cannot hold {self.num_image_codes} image '
                       f'codes from id {tokenizer.IMAGE_OFFSET}')
    ids = jnp.arange(vocab_size, dtype=jnp.int32)[None, :]
    s = jnp.asarray(state, jnp.int32)[:, None]
    text = (ids >= tokenizer.TEXT_OFFSET) & (ids < tokenizer.TEXT_OFFSET + 256)
    outside = text | (ids == tokenizer.BOI) | (ids == tokenizer.EOS)
    in_image = (s >= 0) & (s < self.num_image_tokens)
    return ((s == OUTSIDE) & outside
            | in_image & self._is_code(ids)
            | (s == self.num_image_tokens) & (ids == tokenizer.EOI)
            | (s == FINISHED) & (ids == tokenizer.PAD))

  def advance(self, state: jax.Array, token: jax.Array) -> jax.Array:
    """int32 [B]: the state after emitting `token` [B]. BOI opens an image (0), a code
    inside one counts (up to num_image_tokens), EOI closes it (OUTSIDE), EOS finishes;
    FINISHED stays FINISHED; any other token leaves the state as it is."""
    state = jnp.asarray(state, jnp.int32)
    token = jnp.asarray(token, jnp.int32)
    new = jnp.where(token == tokenizer.BOI, 0, state)
    new = jnp.where(token == tokenizer.EOI, OUTSIDE, new)
    counted = jnp.minimum(state + 1, self.num_image_tokens)
    new = jnp.where(self._is_code(token) & (state >= 0), counted, new)
    new = jnp.where((token == tokenizer.EOS) | (state == FINISHED), FINISHED, new)
    return new.astype(jnp.int32)

  def prompt_state(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """int32 [B]: the state after the first lengths[b] tokens of each row of tokens [B, P]
    (OUTSIDE for an empty prompt; the leading BOS leaves it OUTSIDE)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)

    def step(state, t_and_column):
      t, column = t_and_column
      return jnp.where(t < lengths, self.advance(state, column), state), None

    init = jnp.full(tokens.shape[:1], OUTSIDE, jnp.int32)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    state, _ = jax.lax.scan(step, init, (positions, tokens.T))
    return state


def _mask(logits: jax.Array, allowed: Optional[jax.Array]) -> jax.Array:
  logits = jnp.asarray(logits, jnp.float32)
  return logits if allowed is None else jnp.where(allowed, logits, -jnp.inf)


def filter_logits(logits: jax.Array, sampling: Sampling,
                  allowed: Optional[jax.Array] = None) -> jax.Array:
  """float32 [B, V]: the logits to draw from, every excluded token at -inf.

  In order: the grammar mask `allowed` (bool [B, V]), / temperature (not for greedy),
  top-k (the k largest), top-p (the shortest prefix, in descending order, whose softmax
  probability sums to >= top_p; at least one token). Ties go to the lower token id.
  """
  sampling.check()
  logits = _mask(logits, allowed)
  if not sampling.greedy:
    logits = logits / jnp.float32(sampling.temperature)
  V = logits.shape[-1]
  use_k = 0 < sampling.top_k < V
  use_p = sampling.top_p < 1
  if not (use_k or use_p):
    return logits
  order = jnp.argsort(-logits, axis=-1, stable=True)  # descending, lower id first on ties
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  rank = jnp.arange(V, dtype=jnp.int32)[None, :]
  keep = rank < (sampling.top_k if use_k else V)
  if use_p:
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    before = jnp.pad(cum[:, :-1], ((0, 0), (1, 0)))  # probability of higher-ranked tokens
    keep &= (before < sampling.top_p) | (rank == 0)
  rows = jnp.arange(logits.shape[0])[:, None]
  keep_unsorted = jnp.zeros(logits.shape, bool).at[rows, order].set(keep)
  return jnp.where(keep_unsorted, logits, -jnp.inf)


def sample(rng: jax.Array, logits: jax.Array, sampling: Sampling,
           allowed: Optional[jax.Array] = None) -> jax.Array:
  """int32 [B]: the next token of each row. Greedy (temperature 0): argmax of the masked
  logits, lowest id on ties; otherwise a categorical draw from `filter_logits`."""
  sampling.check()
  if sampling.greedy:
    return jnp.argmax(_mask(logits, allowed), axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, sampling, allowed)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
