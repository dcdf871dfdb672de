"""The early-fusion decoder: one token sequence holding text and image tokens.

    tokens [B, T] -> Embed -> L x Block -> RMSNorm -> LM head -> logits [B, T, V]

A Block is pre-norm: `h = x + Attn(Norm(x))`, `y = h + FFN(Norm(h))`. Later model families
(MoE, MoMa, MoT) swap the FFN or the whole block; `Decoder.__call__` returns
`(logits, aux)` where `aux` holds auxiliary losses and metrics of every layer (empty here).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers
from moe import layer as moe_layer
from training.sharding import constrain

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def dtype_of(name: str):
  if name not in DTYPES:
    raise ValueError(f'unknown dtype {name!r}; choose one of {sorted(DTYPES)}')
  return DTYPES[name]


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
  remat: bool = False  # rematerialise each block in the backward pass
  moe: moe_layer.MoESpec | None = None  # MoE FFNs (None = dense model)
  moe_every: int = 1  # layer i has a MoE FFN iff i % moe_every == moe_every - 1
  dtype: str = 'float32'  # compute dtype
  param_dtype: str = 'float32'


class Block(nnx.Module):
  """Pre-norm transformer block with a SwiGLU FFN, or a MoE FFN when `use_moe`."""

  def __init__(self, spec: DecoderSpec, *, use_moe: bool = False, rngs: nnx.Rngs):
    dtype, pdtype = dtype_of(spec.dtype), dtype_of(spec.param_dtype)
    self.attn_norm = layers.RMSNorm(spec.embed_dim, param_dtype=pdtype, rngs=rngs)
    self.attn = layers.Attention(
        embed_dim=spec.embed_dim, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, implementation=spec.attention_impl, dtype=dtype, param_dtype=pdtype, rngs=rngs)
    self.ffn_norm = layers.RMSNorm(spec.embed_dim, param_dtype=pdtype, rngs=rngs)
    self.use_moe = use_moe
    if use_moe:
      self.ffn = moe_layer.MoELayer(spec.moe, embed_dim=spec.embed_dim, dtype=dtype,
                                    param_dtype=pdtype, rngs=rngs)
    else:
      self.ffn = layers.SwiGLU(embed_dim=spec.embed_dim, mlp_dim=spec.mlp_dim, dtype=dtype,
                               param_dtype=pdtype, rngs=rngs)

  def __call__(self, x_BTD, rope_sin_cos, rng=None):
    h = x_BTD + self.attn(self.attn_norm(x_BTD), rope_sin_cos)
    if self.use_moe:
      y, aux = self.ffn(self.ffn_norm(h), rng)
      return h + y, aux
    return h + self.ffn(self.ffn_norm(h)), {}


class Decoder(nnx.Module):
  """Dense early-fusion decoder; `__call__(batch) -> (logits [B, T, V] float32, aux)`."""

  def __init__(self, spec: DecoderSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    dtype, pdtype = dtype_of(spec.dtype), dtype_of(spec.param_dtype)
    self.embed = layers.Embed(vocab_size=spec.vocab_size, embed_dim=spec.embed_dim,
                              dtype=dtype, param_dtype=pdtype, rngs=rngs)
    self.blocks = nnx.List([Block(spec, use_moe=self.is_moe_layer(i), rngs=rngs)
                            for i in range(spec.num_layers)])
    self.final_norm = layers.RMSNorm(spec.embed_dim, param_dtype=pdtype, rngs=rngs)
    self.lm_head = layers.param(rngs, layers.fan_in_init(spec.embed_dim),
                                (spec.embed_dim, spec.vocab_size), ('embed', 'vocab'), pdtype)

  def is_moe_layer(self, i: int) -> bool:
    return self.spec.moe is not None and i % self.spec.moe_every == self.spec.moe_every - 1

  def __call__(self, batch: dict[str, jax.Array], rng: jax.Array | None = None):
    """`rng` (training only) drives stochastic routing (router jitter)."""
    tokens = batch['tokens']
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    sin_cos = layers.rope_tables(positions, self.spec.head_dim, self.spec.rope_theta)
    x = self.embed(tokens)
    aux = {}
    for i, block in enumerate(self.blocks):
      block_rng = None if rng is None else jax.random.fold_in(rng, i)
      if self.spec.remat:
        x, block_aux = nnx.remat(lambda b, *a: b(*a))(block, x, sin_cos, block_rng)
      else:
        x, block_aux = block(x, sin_cos, block_rng)
      aux.update({f'layer_{i}/{k}': v for k, v in block_aux.items()})
    x = self.final_norm(x)
    dtype = dtype_of(self.spec.dtype)
    B, T, D = x.shape
    logits = (x.reshape(B * T, D) @ self.lm_head[...].astype(dtype)).reshape(B, T, -1)
    logits = constrain(logits.astype(jnp.float32), ('batch', 'length', 'act_vocab'))
    return logits, aux


def moe_spec_from_config(moe_cfg) -> moe_layer.MoESpec:
  dropless = moe_cfg.dispatch == 'dropless'
  router = moe_layer.routing.RouterConfig(
      name=moe_cfg.router, k=moe_cfg.k,
      capacity_factor=None if dropless else moe_cfg.capacity_factor,
      renormalize=moe_cfg.renormalize, jitter=moe_cfg.jitter,
      load_balance_coef=moe_cfg.load_balance_coef, z_loss_coef=moe_cfg.z_loss_coef)
  return moe_layer.MoESpec(
      num_experts=moe_cfg.num_experts, mlp_dim=moe_cfg.mlp_dim, router=router,
      dispatch=moe_cfg.dispatch, group_size=moe_cfg.group_size,
      num_shared_experts=moe_cfg.num_shared_experts, residual=moe_cfg.residual)


def spec_from_config(model_cfg, *, param_dtype: str, compute_dtype: str) -> DecoderSpec:
  moe = None
  if model_cfg.family == 'moe':
    moe = moe_spec_from_config(model_cfg.moe)
  return DecoderSpec(
      vocab_size=model_cfg.vocab_size, num_layers=model_cfg.num_layers,
      embed_dim=model_cfg.embed_dim, num_heads=model_cfg.num_heads,
      num_kv_heads=model_cfg.num_kv_heads, head_dim=model_cfg.head_dim,
      mlp_dim=model_cfg.mlp_dim, rope_theta=model_cfg.rope_theta,
      attention_impl=model_cfg.attention_impl or None, remat=model_cfg.remat,
      dtype=compute_dtype, param_dtype=param_dtype, moe=moe,
      moe_every=model_cfg.moe.every if moe else 1)


def _ffn_params(spec: DecoderSpec, use_moe: bool, active: bool) -> int:
  d = spec.embed_dim
  if not use_moe:
    return 3 * d * spec.mlp_dim
  m = spec.moe
  expert = 3 * d * m.mlp_dim
  if active:  # experts a token goes through on average: k, or c for expert choice
    routed = (m.router.capacity_factor if m.router.expert_choice else m.router.k) * expert
  else:
    routed = m.num_experts * expert
  extra = m.num_shared_experts * expert + (expert + 2 * d if m.residual else 0)
  return int(routed) + d * m.num_experts + extra


def param_count(spec: DecoderSpec, *, embeddings: bool = True, active: bool = False) -> int:
  """Number of parameters from the spec alone (no model built). `active`: those one token
  uses (routed experts counted k times, or c times under expert choice)."""
  d, h, g, k = spec.embed_dim, spec.num_heads, spec.num_kv_heads, spec.head_dim
  attn_and_norms = d * (h + 2 * g) * k + h * k * d + 2 * d
  total = sum(attn_and_norms + _ffn_params(spec, spec.moe is not None and
                                           i % spec.moe_every == spec.moe_every - 1, active)
              for i in range(spec.num_layers))
  total += d + d * spec.vocab_size  # final norm + LM head
  return total + (spec.vocab_size * d if embeddings else 0)
