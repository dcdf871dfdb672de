"""Generation from the early-fusion decoder: a prefill, then one cached token per step.

    prompt [B, P] (row b's first lengths[b] tokens) -> Decoder.decode(prompt[:, :p], index 0)
      (p = the shortest prompt) -> repeat: next = the row's own prompt token while it lasts,
         else sample(logits of the last position, grammar mask) -> write at p + i ->
         Decoder.decode(next, index p + i)
      until every row wrote EOS or `num_new` tokens

Decoding is causal by construction: `Decoder.decode` routes as `causal=True` does (MoMa's
auxiliary routers and mixture-of-depths decide per token; token-choice MoE drops nothing;
MoT projects each token with its modality's weights), and every block keeps a cache of its
keys and values (models/transformer.py, core/layers.attend_cached). A family whose routing
sees the future and has no causal router (expert-choice MoE) is refused by `check`.

`generator(...)` compiles the whole loop once per (batch, prompt buffer, max_len) shape:
the step's position is data, so no position recompiles it. The sampler and the format
grammar are models/sampling.py's. `recompute_greedy` is the uncached baseline (the whole
buffer through the full pass every step), kept for benchmarks/decode.py and tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core.partitioning import constrain
from data import tokenizer
from models import families, sampling as sampling_lib
from models.transformer import modality_of

__all__ = ['check', 'generator', 'recompute_greedy', 'modality_of']


def check(spec, *, prompt_len: int, max_len: int) -> None:
  """One-line errors before anything compiles: the family decodes, the prompt fits."""
  reason = families.get(spec.family).decode_unsupported(spec)
  if reason:
    raise ValueError(reason)
  if prompt_len < 1:
    raise ValueError('the prompt is empty: it needs at least BOS')
  if prompt_len >= max_len:
    raise ValueError(f'the prompt has {prompt_len} tokens: no room to generate in the '
                     f'{max_len} positions the model was trained on (seq_len)')


def _write(tokens_BL, token_B, pos_B):
  return jax.vmap(lambda row, t, p: jax.lax.dynamic_update_index_in_dim(row, t, p, 0))(
      tokens_BL, token_B, pos_B)


def generator(graphdef, *, num_new: int, max_len: int, sampling: sampling_lib.Sampling,
              grammar: sampling_lib.Grammar | None = None, stop_at_eos: bool = True):
  """-> `fn(params, prompt [B, P] int32, lengths [B] int32, rng, prefill=None) -> tokens
  [B, max_len]`: each row's prompt (its first lengths[b] tokens), then its generated tokens,
  then PAD. A row stops after EOS, after `num_new` tokens or at the end of the buffer
  (max_len: the positions the model was trained on). Greedy when `sampling.temperature ==
  0`; with `grammar` only tokens the sequence format allows are sampled. P <= max_len.
  `stop_at_eos=False` (benchmarks): every row runs its `num_new` steps.

  The first `prefill` positions (default: the shortest prompt) go through one prefill
  call; a longer prompt's remaining tokens are then fed one per step, as the generated ones
  are, so no row's cache ever holds another row's padding: what a recurrent state (Mamba)
  needs, which cannot be rewound. One compilation per `prefill` value."""
  sampling.check()

  @functools.partial(jax.jit, static_argnames='prefill')
  def run(params, prompt, lengths, rng, prefill):
    model = nnx.merge(graphdef, params)
    B, P = prompt.shape
    cache = model.init_cache(B, max_len)
    tokens = jnp.full((B, max_len), tokenizer.PAD, jnp.int32).at[:, :P].set(prompt)
    tokens = constrain(tokens, ('batch', None))
    logits, cache = model.decode(prompt[:, :prefill], cache, jnp.zeros((B,), jnp.int32))
    last = logits[:, -1]
    state = (grammar.prompt_state(prompt, jnp.minimum(lengths, prefill))
             if grammar is not None else jnp.zeros((B,), jnp.int32))
    done = lengths >= max_len
    V = logits.shape[-1]
    padded = jnp.pad(prompt, ((0, 0), (0, max_len - P)))

    def body(carry):
      i, tokens, cache, last, state, done = carry
      pos = jnp.full((B,), prefill, jnp.int32) + i  # the position written this step
      forced = pos < lengths  # still inside the row's own prompt
      allowed = grammar.allowed(state, V) if grammar is not None else None
      token = sampling_lib.sample(jax.random.fold_in(rng, i), last, sampling, allowed)
      token = jnp.where(forced, padded[jnp.arange(B), jnp.minimum(pos, max_len - 1)], token)
      token = jnp.where(done, tokenizer.PAD, token).astype(jnp.int32)
      pos = jnp.minimum(pos, max_len - 1)  # a done row's writes are PAD or unread
      tokens = _write(tokens, jnp.where(done, tokens[jnp.arange(B), pos], token), pos)
      new = pos - lengths + 1  # tokens this row has generated, this one included
      done = done | (~forced & (((token == tokenizer.EOS) & stop_at_eos) | (new >= num_new))) \
          | (pos + 1 >= max_len)
      if grammar is not None:
        state = grammar.advance(state, token)
      logits, cache = model.decode(token[:, None], cache, pos)
      return i + 1, tokens, cache, logits[:, 0], state, done

    carry = (jnp.int32(0), tokens, cache, last, state, done)
    carry = jax.lax.while_loop(lambda c: (c[0] < max_len - prefill) & ~jnp.all(c[5]), body,
                               carry)
    return carry[1]

  def call(params, prompt, lengths, rng, prefill=None):
    if prefill is None:
      prefill = int(np.min(np.asarray(lengths)))
    if not 1 <= prefill <= prompt.shape[1]:
      raise ValueError(f'prefill={prefill} must be in [1, prompt length {prompt.shape[1]}]')
    return run(params, prompt, lengths, rng, prefill)

  return call


def recompute_greedy(graphdef, params, prompt_BP: jax.Array, num_new: int, *,
                     causal: bool = True):
  """The uncached baseline: the prompt followed by `num_new` greedy tokens, the whole
  fixed-length buffer through the full pass at every step -> int32 [B, P + num_new]."""
  B, P = prompt_BP.shape
  T = P + num_new
  tokens = jnp.full((B, T), tokenizer.PAD, jnp.int32).at[:, :P].set(prompt_BP)

  @jax.jit
  def step(tokens, t):
    model = nnx.merge(graphdef, params)
    logits, _ = model({'tokens': tokens, 'modality': modality_of(tokens)}, causal=causal)
    next_token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1,
                                                         keepdims=False), axis=-1)
    return jax.lax.dynamic_update_index_in_dim(tokens, next_token.astype(jnp.int32)[:, None],
                                               t, axis=1)

  for t in range(P, T):
    tokens = step(tokens, jnp.int32(t))
  return tokens
