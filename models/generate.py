"""Greedy generation from the early-fusion decoder, with causal routing.

    prompt [B, P] -> repeat: logits = model(tokens, causal=True)[:, t] -> argmax -> append

Each new token's modality comes from its id (data/tokenizer.py: image codes are IMAGE, all
else TEXT), so a MoMa model routes it to its modality's experts. `causal=True` makes MoMa
route with the auxiliary routers (and MoD decide per token), so a token's prediction never
depends on tokens after it: what generation needs, since those do not exist yet. Dense and
MoE-token-choice models are causal anyway and ignore the flag.

The whole fixed-length buffer is recomputed every step (no KV cache): simple, jit-compiled
once, and meant for evaluation and tests, not fast serving.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from data import tokenizer


def modality_of(tokens: jax.Array) -> jax.Array:
  """int32 modality id of every token (jnp twin of data.tokenizer.modality_of)."""
  return (tokens >= tokenizer.IMAGE_OFFSET).astype(jnp.int32)


def greedy(graphdef, params, prompt_BP: jax.Array, num_new: int, *, causal: bool = True):
  """The prompt followed by `num_new` greedily decoded tokens: int32 [B, P + num_new]."""
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
