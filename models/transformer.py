"""The early-fusion decoder: one token sequence holding text and image tokens.

    tokens [B, T] -> Embed -> L x Block -> RMSNorm -> LM head -> logits [B, T, V]

The blocks are the family's (`spec.family`, looked up in models/families.py: dense, moe,
moma, mot): the decoder never asks which family it runs. `Decoder.__call__` returns
`(logits, aux)` where `aux` holds the auxiliary losses and metrics of every layer, and with
`attention_stats=True` (eval only) the attention sink and the residual stream's peak
(`ATTENTION_STATS`, docs/gates.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from core import layers, partitioning
from core.partitioning import constrain
from data import tokenizer
from models import families, mod as mod_lib, moma as moma_lib, mot as mot_lib
from moe import layer as moe_layer
from moe import routing

dtype_of = layers.dtype_of

# aux keys of `Decoder(..., attention_stats=True)` (summed, summed, max over eval batches):
# sink share = sink_sum / sink_count, the attention probability on the first key averaged
# over layers, heads and the valid (non-PAD) query positions > 0; max_activation = the
# largest |x| of the residual stream after any block, over the valid tokens.
ATTENTION_STATS = ('attention/sink_sum', 'attention/sink_count', 'attention/max_activation')


def modality_of(tokens: jax.Array) -> jax.Array:
  """int32 modality id of every token (jnp twin of data.tokenizer.modality_of)."""
  return jnp.where(tokens >= tokenizer.IMAGE_OFFSET, tokenizer.IMAGE,
                   tokenizer.TEXT).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
  """The decoder's hyper-parameters (built from `config.model` by `from_config`)."""
  vocab_size: int  # V
  num_layers: int  # L
  embed_dim: int  # D
  num_heads: int  # H
  num_kv_heads: int  # G (grouped-query attention when G < H)
  head_dim: int  # K
  mlp_dim: int  # F
  rope_theta: float = 10_000.0
  attention_impl: str | None = None  # jax.nn.dot_product_attention implementation
  attn_gate: str = 'none'  # core/layers.py ATTN_GATES: sigmoid gate on the attention output
  remat: bool = False  # rematerialise each block in the backward pass
  family: str = 'dense'  # a key of models/families.py FAMILIES: whose blocks
  # The families' own settings (set by their `spec_fields`; a new family keeps its in `ext`):
  moe: moe_layer.MoESpec | None = None  # family 'moe': the MoE FFN
  moe_every: int = 1  # family 'moe': layer i has a MoE FFN iff i % moe_every == moe_every - 1
  moma: moma_lib.MoMaSpec | None = None  # family 'moma': modality-grouped experts
  mod: mod_lib.MoDSpec | None = None  # family 'moma': mixture-of-depths (None = off)
  mot: mot_lib.MoTSpec | None = None  # family 'mot': modality-untied blocks
  ext: Any = None  # a family's spec without a field of its own
  num_modalities: int = 2
  dtype: str = 'float32'  # compute dtype
  param_dtype: str = 'float32'


class Decoder(nnx.Module):
  """The early-fusion decoder; `__call__(batch) -> (logits [B, T, V] float32, aux)`."""

  def __init__(self, spec: DecoderSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    dtype, pdtype = dtype_of(spec.dtype), dtype_of(spec.param_dtype)
    self.embed = layers.Embed(vocab_size=spec.vocab_size, embed_dim=spec.embed_dim,
                              dtype=dtype, param_dtype=pdtype, rngs=rngs)
    family = families.get(spec.family)
    self.blocks = nnx.List([family.block(spec, i, rngs) for i in range(spec.num_layers)])
    self.final_norm = layers.RMSNorm(spec.embed_dim, param_dtype=pdtype, rngs=rngs)
    self.lm_head = partitioning.param(rngs, partitioning.fan_in_init(spec.embed_dim),
                                (spec.embed_dim, spec.vocab_size), ('embed', 'vocab'), pdtype)

  def __call__(self, batch: dict[str, jax.Array], rng: jax.Array | None = None, *,
               step: jax.Array | None = None, causal: bool = False,
               attention_stats: bool = False):
    """`rng` (training only) drives stochastic routing (router jitter, Gumbel noise).
    `step` (int32 scalar, the training step): the schedules of the dense-to-sparse gates
    (moe/routing.py `temperature`, evomoe's hard phase); None = their end. The blocks get
    both as one `routing.Draw` per layer (their `rng` argument), or None when both are.
    `causal`: route with the auxiliary routers (MoMa), so position t never depends on
    tokens after t; the default batch routing is the training-time function.
    `attention_stats` (static; eval): also the `ATTENTION_STATS` in aux, from the sink
    shares the attention layers sow (`attention_stats` attributes: core/layers.Attention,
    MoT's blocks; a family without them reports only the peak)."""
    tokens, modality = batch['tokens'], batch.get('modality')  # MoMa needs modality
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    sin_cos = layers.rope_tables(positions, self.spec.head_dim, self.spec.rope_theta)
    family = families.get(self.spec.family)
    x_BTD = self.embed(tokens)
    x = family.stream_in(self, x_BTD, modality)  # e.g. MoT's rows layout
    if not attention_stats:
      x, aux, _ = self._blocks(x, sin_cos, rng, step, modality, causal)
    else:
      valid = tokens != tokenizer.PAD
      # the valid tokens in the stream's layout (MoT: its rows; padding rows are 0)
      in_stream = family.stream_in(
          self, jnp.broadcast_to(valid[..., None], x_BTD.shape).astype(x_BTD.dtype), modality)
      self.set_attributes(attention_stats=True, raise_if_not_found=False)
      (x, aux, peak), sown = nnx.capture(Decoder._blocks, nnx.Intermediate)(
          self, x, sin_cos, rng, step, modality, causal, in_stream)
      self.set_attributes(attention_stats=False, raise_if_not_found=False)
      aux.update(_attention_stats(sown, valid))
      aux['attention/max_activation'] = peak
    x = self.final_norm(family.stream_out(self, x, modality))
    return self._logits(x), aux

  def _blocks(self, x, sin_cos, rng, step, modality, causal, in_stream=None):
    """The blocks on the stream -> (x, aux, max |x| over `in_stream` after any block, or
    None without `in_stream`)."""
    aux, peak = {}, None
    call = lambda b, x, sc, r, m: b(x, sc, r, modality=m, causal=causal)
    if self.spec.remat:
      call = nnx.remat(call)
    draw = None if rng is None and step is None else routing.Draw(key=rng, step=step)
    for i, block in enumerate(self.blocks):
      block_rng = None if draw is None else draw.fold_in(i)
      x, block_aux = call(block, x, sin_cos, block_rng, modality)
      aux.update({f'layer_{i}/{k}': v for k, v in block_aux.items()})
      if in_stream is not None:
        m = jnp.max(jnp.abs(x.astype(jnp.float32)) * in_stream.astype(jnp.float32))
        peak = m if peak is None else jnp.maximum(peak, m)
    return x, aux, peak

  def init_cache(self, batch: int, max_len: int) -> list:
    """The decoding cache for `batch` rows of up to `max_len` positions: one entry per
    block (its K/V, and what else its routing keeps, e.g. MoD's selected positions)."""
    return [block.init_cache(batch, max_len) for block in self.blocks]

  def decode(self, tokens_BS: jax.Array, cache: list, index_B: jax.Array):
    """S new tokens per row at positions index[b] .. index[b] + S - 1, with the causal
    routing (`causal=True`) and the cache of every earlier position -> (logits [B, S, V]
    float32, cache). A prefill is a call with index 0 and the prompt; a decoding step one
    with S = 1. Row b's logits equal `__call__(..., causal=True)` on the row's whole
    sequence at those positions (tests/test_decode.py). The blocks run on [B, S, D] in the
    original order (a family's `stream_in` layout is for the full pass)."""
    S = tokens_BS.shape[1]
    positions = index_B[:, None] + jnp.arange(S, dtype=index_B.dtype)
    sin_cos = layers.rope_tables(positions, self.spec.head_dim, self.spec.rope_theta)
    modality = modality_of(tokens_BS)
    x = self.embed(tokens_BS)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x, layer_cache = block.decode(x, sin_cos, modality=modality, cache=layer_cache,
                                    index=index_B)
      new_cache.append(layer_cache)
    return self._logits(self.final_norm(x)), new_cache

  def _logits(self, x_BTD):
    dtype = dtype_of(self.spec.dtype)
    B, T, D = x_BTD.shape
    logits = (x_BTD.reshape(B * T, D) @ self.lm_head[...].astype(dtype)).reshape(B, T, -1)
    return constrain(logits.astype(jnp.float32), ('batch', 'length', 'act_vocab'))


def _attention_stats(sown, valid_BT) -> dict:
  """Sink sums over the layers' sown sink shares ([B, T_a] per attention call, T_a = T or a
  mixture-of-depths layer's selected tokens, whose positions it sows as `query_index`),
  weighted by the valid queries after the first one the attention sees."""
  by_layer: dict = {}
  for path, variable in nnx.to_flat_state(sown):
    if path[0] == 'blocks':
      by_layer.setdefault(path[1], {})[path[-1]] = variable.get_value()
  total = count = jnp.zeros((), jnp.float32)
  found = False
  first = jnp.arange(valid_BT.shape[1]) > 0
  for entry in by_layer.values():
    for sink in entry.get('sink', ()):
      if 'query_index' in entry:  # [B, k] positions, in order
        idx = entry['query_index'][0]
        weight = (jnp.take_along_axis(valid_BT, idx, axis=1)
                  & (jnp.arange(idx.shape[1]) > 0))
      else:
        weight = valid_BT & first
        if 'query_mask' in entry:  # a causal MoD layer: the tokens it processed
          weight = weight & entry['query_mask'][0]
      w = weight.astype(jnp.float32)
      total, count, found = total + jnp.sum(sink * w), count + jnp.sum(w), True
  return {'attention/sink_sum': total, 'attention/sink_count': count} if found else {}


def spec_from_config(model_cfg, *, param_dtype: str, compute_dtype: str,
                     stage: str = 'main') -> DecoderSpec:
  """config.model -> DecoderSpec; the family (models/families.py) fills in its own fields."""
  fields = families.get(model_cfg.family).spec_fields(model_cfg, stage)
  return DecoderSpec(
      vocab_size=model_cfg.vocab_size, num_layers=model_cfg.num_layers,
      embed_dim=model_cfg.embed_dim, num_heads=model_cfg.num_heads,
      num_kv_heads=model_cfg.num_kv_heads, head_dim=model_cfg.head_dim,
      mlp_dim=model_cfg.mlp_dim, rope_theta=model_cfg.rope_theta,
      attention_impl=model_cfg.attention_impl or None, attn_gate=model_cfg.attn_gate,
      remat=model_cfg.remat, dtype=compute_dtype, param_dtype=param_dtype, family=model_cfg.family,
      num_modalities=len(tokenizer.MODALITIES), **fields)


def param_count(spec: DecoderSpec, *, embeddings: bool = True, active: bool = False) -> int:
  """Number of parameters from the spec alone (no model built). `active`: those one token
  uses (routed experts counted k times, or c times under expert choice)."""
  family, d = families.get(spec.family), spec.embed_dim
  total = int(sum(family.layer_params(spec, i, active) for i in range(spec.num_layers)))
  total += d + d * spec.vocab_size  # final norm + LM head
  return total + (spec.vocab_size * d if embeddings else 0)
