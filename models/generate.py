"""Generation from the early-fusion decoder: a prefill, then one cached token per step.

    prompt [B, P] (row b's first lengths[b] tokens) -> Decoder.decode(prompt, index 0)
      -> repeat: next = sample(logits of the last position, grammar mask) -> write at
         lengths[b] + i -> Decoder.decode(next, index lengths[b] + i)
      until every row wrote EOS or `num_new` steps

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

import jax
import jax.numpy as jnp
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
  """-> jitted `fn(params, prompt [B, P] int32, lengths [B] int32, rng) -> tokens [B,
  max_len]`: each row's prompt (its first lengths[b] tokens), then its generated tokens,
  then PAD. A row stops after EOS, after `num_new` tokens or at the end of the buffer
  (max_len: the positions the model was trained on). Greedy when `sampling.temperature ==
  0`; with `grammar` only tokens the sequence format allows are sampled. P <= max_len.
  `stop_at_eos=False` (benchmarks): every row runs its `num_new` steps."""
  sampling.check()

  @jax.jit
  def run(params, prompt, lengths, rng):
    model = nnx.merge(graphdef, params)
    B, P = prompt.shape
    cache = model.init_cache(B, max_len)
    tokens = jnp.full((B, max_len), tokenizer.PAD, jnp.int32).at[:, :P].set(prompt)
    tokens = constrain(tokens, ('batch', None))
    logits, cache = model.decode(prompt, cache, jnp.zeros((B,), jnp.int32))
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    state = (grammar.prompt_state(prompt, lengths) if grammar is not None
             else jnp.zeros((B,), jnp.int32))
    done = lengths >= max_len
    V = logits.shape[-1]

    def body(carry):
      i, tokens, cache, last, state, done = carry
      allowed = grammar.allowed(state, V) if grammar is not None else None
      token = sampling_lib.sample(jax.random.fold_in(rng, i), last, sampling, allowed)
      token = jnp.where(done, tokenizer.PAD, token).astype(jnp.int32)
      pos = jnp.minimum(lengths + i, max_len - 1)  # a done row's writes are PAD or unread
      tokens = _write(tokens, jnp.where(done, tokens[jnp.arange(B), pos], token), pos)
      done = done | ((token == tokenizer.EOS) & stop_at_eos) | (pos + 1 >= max_len)
      if grammar is not None:
        state = grammar.advance(state, token)
      logits, cache = model.decode(token[:, None], cache, pos)
      return i + 1, tokens, cache, logits[:, 0], state, done

    carry = (jnp.int32(0), tokens, cache, last, state, done)
    carry = jax.lax.while_loop(lambda c: (c[0] < num_new) & ~jnp.all(c[5]), body, carry)
    return carry[1]

  return run


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
