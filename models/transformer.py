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

from data import tokenizer
from models import layers, mod as mod_lib, moma as moma_lib, mot as mot_lib
from moe import layer as moe_layer
from training.sharding import constrain

dtype_of = layers.dtype_of


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
  moma: moma_lib.MoMaSpec | None = None  # MoMa blocks (modality-grouped experts) everywhere
  mod: mod_lib.MoDSpec | None = None  # mixture-of-depths (MoMa blocks only)
  mot: mot_lib.MoTSpec | None = None  # Mixture-of-Transformers blocks everywhere
  num_modalities: int = 2
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

  def __call__(self, x_BTD, rope_sin_cos, rng=None, *, modality=None, causal=False):
    del modality, causal  # the same weights for every token; no batch-dependent routing
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
    self.blocks = nnx.List([
        moma_lib.MoMaBlock(spec, i, num_modalities=spec.num_modalities, rngs=rngs)
        if spec.moma is not None else mot_lib.MoTBlock(spec, rngs=rngs)
        if spec.mot is not None else Block(spec, use_moe=self.is_moe_layer(i), rngs=rngs)
        for i in range(spec.num_layers)])
    self.final_norm = layers.RMSNorm(spec.embed_dim, param_dtype=pdtype, rngs=rngs)
    self.lm_head = layers.param(rngs, layers.fan_in_init(spec.embed_dim),
                                (spec.embed_dim, spec.vocab_size), ('embed', 'vocab'), pdtype)

  def is_moe_layer(self, i: int) -> bool:
    return self.spec.moe is not None and i % self.spec.moe_every == self.spec.moe_every - 1

  def __call__(self, batch: dict[str, jax.Array], rng: jax.Array | None = None, *,
               causal: bool = False):
    """`rng` (training only) drives stochastic routing (router jitter, Gumbel noise).
    `causal`: route with the auxiliary routers (MoMa), so position t never depends on
    tokens after t; the default batch routing is the training-time function."""
    tokens, modality = batch['tokens'], batch.get('modality')  # MoMa needs modality
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    sin_cos = layers.rope_tables(positions, self.spec.head_dim, self.spec.rope_theta)
    x = self.embed(tokens)
    mot = self.spec.mot is not None  # MoT blocks carry the stream in their rows layout
    if mot:
      x = self.blocks[0].stream_in(x, modality)
    aux = {}
    call = lambda b, x, sc, r, m: b(x, sc, r, modality=m, causal=causal)
    if self.spec.remat:
      call = nnx.remat(call)
    for i, block in enumerate(self.blocks):
      block_rng = None if rng is None else jax.random.fold_in(rng, i)
      x, block_aux = call(block, x, sin_cos, block_rng, modality)
      aux.update({f'layer_{i}/{k}': v for k, v in block_aux.items()})
    if mot:
      x = self.blocks[0].stream_out(x, modality)
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


def moma_spec_from_config(moma_cfg, *, train_aux: bool = False) -> moma_lib.MoMaSpec:
  """config.model.moma -> MoMaSpec: expert groups in modality-id order, then the shared
  (MoIIE) pool if any. capacity '' = 1 / experts of the group (the paper's c_e)."""
  names = tokenizer.MODALITIES
  counts = moma_lib.parse_groups(moma_cfg.groups, names)
  cap = lambda n, c: float(c) if str(c) != '' else 1.0 / n
  groups = [moma_lib.Group(name, n, cap(n, moma_cfg.capacity), (i,))
            for i, (name, n) in enumerate(counts)]
  if moma_cfg.shared_experts:
    groups.append(moma_lib.Group(moma_lib.SHARED, moma_cfg.shared_experts,
                                 cap(moma_cfg.shared_experts, moma_cfg.shared_capacity),
                                 tuple(range(len(names)))))
  return moma_lib.MoMaSpec(
      groups=tuple(groups), mlp_dim=moma_cfg.mlp_dim, router=moma_cfg.router, k=moma_cfg.k,
      group_sequences=moma_cfg.group_sequences, gumbel=moma_cfg.gumbel,
      load_balance_coef=moma_cfg.load_balance_coef, norm=moma_cfg.norm,
      train_aux=train_aux)


def mod_spec_from_config(mod_cfg) -> mod_lib.MoDSpec | None:
  if not mod_cfg.enabled:
    return None
  return mod_lib.MoDSpec(capacity=mod_cfg.capacity, every=mod_cfg.every, scale=mod_cfg.scale)


def mot_spec_from_config(mot_cfg) -> mot_lib.MoTSpec:
  names = tokenizer.MODALITIES
  untie = frozenset(p.strip() for p in mot_cfg.untie.split(',') if p.strip())
  moe_modality = moe = None
  if mot_cfg.moe_modality:
    if mot_cfg.moe_modality not in names:
      raise ValueError(f'model.mot.moe_modality={mot_cfg.moe_modality!r} is not one of '
                       f'{names}')
    moe_modality, moe = names.index(mot_cfg.moe_modality), moe_spec_from_config(mot_cfg.moe)
  return mot_lib.MoTSpec(untie=untie, num_modalities=len(names), qk_norm=mot_cfg.qk_norm,
                         norm=mot_cfg.norm, moe_modality=moe_modality, moe=moe)


def spec_from_config(model_cfg, *, param_dtype: str, compute_dtype: str,
                     stage: str = 'main') -> DecoderSpec:
  moe = moma = mod = mot = None
  if model_cfg.family == 'mot':
    mot = mot_spec_from_config(model_cfg.mot)
  if model_cfg.family == 'moe':
    moe = moe_spec_from_config(model_cfg.moe)
  if model_cfg.family == 'moma':
    moma = moma_spec_from_config(model_cfg.moma, train_aux=stage == 'aux')
    mod = mod_spec_from_config(model_cfg.moma.mod)
  return DecoderSpec(
      vocab_size=model_cfg.vocab_size, num_layers=model_cfg.num_layers,
      embed_dim=model_cfg.embed_dim, num_heads=model_cfg.num_heads,
      num_kv_heads=model_cfg.num_kv_heads, head_dim=model_cfg.head_dim,
      mlp_dim=model_cfg.mlp_dim, rope_theta=model_cfg.rope_theta,
      attention_impl=model_cfg.attention_impl or None, remat=model_cfg.remat,
      dtype=compute_dtype, param_dtype=param_dtype, moe=moe,
      moe_every=model_cfg.moe.every if moe else 1, moma=moma, mod=mod, mot=mot,
      num_modalities=len(tokenizer.MODALITIES))


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


def _moma_layer_params(spec: DecoderSpec, i: int, active: bool) -> float:
  """One MoMa layer's FFN (+ MoD router). Active: a token of modality m goes through
  c_m * E_m experts of its group on average (1 with the default c), plus c_s * E_s of the
  shared pool; a MoD layer is active for a fraction c_d of the tokens. Aux routers are not
  counted (they only run at causal inference)."""
  m, d = spec.moma, spec.embed_dim
  expert = 3 * d * m.mlp_dim
  if not active:
    aux = sum(d * (d // 2) + (d // 2) * m.groups[j].experts for j in m.aux_groups())
    return m.num_experts * expert + d * m.num_experts + aux
  per_token = lambda g: (m.k if m.router == 'topk' else g.capacity * g.experts) if g.routed else 1
  mod_groups = [g for g in m.groups if g.name != moma_lib.SHARED]
  shared = sum(per_token(g) for g in m.groups if g.name == moma_lib.SHARED)
  routed = (sum(per_token(g) for g in mod_groups) / len(mod_groups) + shared) * expert
  return routed + d * m.num_experts


def _mot_layer_params(spec: DecoderSpec, active: bool) -> float:
  """One MoT layer: untied parts count M times (once when `active`: a token uses its own
  modality's copy); a MoE modality's FFN counts k experts when active (averaged over the
  modalities, as for MoMa)."""
  m, d = spec.mot, spec.embed_dim
  M = m.num_modalities
  h, g, k = spec.num_heads, spec.num_kv_heads, spec.head_dim
  copies = lambda part: 1 if active or part not in m.untie else M
  attn = (d * (h + 2 * g) * k + h * k * d + (2 * k if m.qk_norm else 0)) * copies('attn')
  norms = 2 * d * copies('norm')
  ffn = 3 * d * spec.mlp_dim
  if m.moe is None:
    return attn + norms + ffn * copies('ffn')
  e = m.moe
  moe = 3 * d * e.mlp_dim * (e.router.k if active else e.num_experts) + d * e.num_experts
  if active:
    return attn + norms + ((M - 1) * ffn + moe) / M
  return attn + norms + ffn * ((M - 1) if 'ffn' in m.untie else 1) + moe


def param_count(spec: DecoderSpec, *, embeddings: bool = True, active: bool = False) -> int:
  """Number of parameters from the spec alone (no model built). `active`: those one token
  uses (routed experts counted k times, or c times under expert choice)."""
  d, h, g, k = spec.embed_dim, spec.num_heads, spec.num_kv_heads, spec.head_dim
  attn_and_norms = d * (h + 2 * g) * k + h * k * d + 2 * d

  def layer(i: int) -> float:
    if spec.mot is not None:
      return _mot_layer_params(spec, active)
    if spec.moma is None:
      return attn_and_norms + _ffn_params(
          spec, spec.moe is not None and i % spec.moe_every == spec.moe_every - 1, active)
    n = attn_and_norms + _moma_layer_params(spec, i, active)
    if spec.mod is not None and spec.mod.is_mod_layer(i):
      n = n * spec.mod.capacity + d if active else n + d + d * (d // 2) + d // 2
    return n

  total = int(sum(layer(i) for i in range(spec.num_layers)))
  total += d + d * spec.vocab_size  # final norm + LM head
  return total + (spec.vocab_size * d if embeddings else 0)
