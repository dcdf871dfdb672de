"""MoIIE: mixture of intra- and inter-modality experts (Wang et al. 2025, arXiv 2508.09779).

The dense family's pre-norm blocks with, every `model.moiie.every` layers (default 2: layers
1, 3, ...), a MoIIE FFN in place of the SwiGLU:

    h = x + Attn(Norm(x)),   y = h + MoIIE(Norm(h), modality)

One expert list per MoIIE layer, stacked on ONE expert axis: each modality's own
(intra-modality) experts, then a shared (inter-modality) pool. Each modality has its own
router over its candidates (its experts and the pool): one softmax over them, token-choice
top-k, the k weights renormalised to sum to 1, multiplicative router-input jitter in
training, and a Switch load-balance loss per router over its own candidates and tokens
(moe/moiie.py owns the routing). The routing is ordinary `moe.routing.Routing` pairs, run by
`moe.layer.run_experts(..., dropless=True)`, so dispatch, the grouped kernels and expert
parallelism serve it unchanged. Token choice routes each token alone: decoding is the same
FFN on the new tokens, and the model is causal without auxiliary routers.

Not MoMa's `shared=N` (models/moma.py): there a separately routed shared group adds its own
expert-choice (or top-k) output to the modality group's; here the pool competes with the
modality's own experts inside one softmax and one top-k. docs/moiie.md compares the two.

Upcycling (`upcycle`, from a trained dense run): every expert of layer i a copy of the dense
FFN of layer i, everything else copied but the routers (fresh). The renormalised weights of
a token's k copies sum to 1, so the upcycled model is exactly the dense one.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
from flax import nnx

from core import layers, partitioning
from core.partitioning import constrain
from data import tokenizer
from models import dense, family as family_lib, moma as moma_lib, upcycle as upcycle_lib
from moe import layer as moe_layer
from moe import modality as modality_lib
from moe import moiie as moiie_routing
from moe import routing
from moe.experts import Experts


@dataclasses.dataclass(frozen=True)
class MoIIESpec:
  """Settings of the MoIIE FFNs (built from `config.model.moiie`; DecoderSpec.ext)."""
  pool: moiie_routing.Pool  # experts per modality + the shared pool
  mlp_dim: int  # F of each expert
  k: int = 2  # experts per token (among its modality's candidates)
  every: int = 2  # layer i has a MoIIE FFN iff i % every == every - 1
  jitter: float = 0.01  # eps of x * U(1 - eps, 1 + eps) on the router input, training only
  load_balance_coef: float = 0.01  # alpha of the per-router Switch losses (summed)
  grouped_impl: str = 'auto'  # dropless kernel (moe/grouped.py)

  def is_moe_layer(self, layer: int) -> bool:
    return layer % self.every == self.every - 1


def parse_groups(text: str, modalities: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
  """'4t4i' -> (('text', 4), ('image', 4)): MoMa's groups syntax (models/moma.py)."""
  try:
    return moma_lib.parse_groups(text, modalities)
  except ValueError as e:
    raise ValueError(str(e).replace('model.moma.', 'model.moiie.')) from None


def spec_from_config(moiie_cfg, grouped_impl: str = 'auto') -> MoIIESpec:
  counts = parse_groups(moiie_cfg.groups, tokenizer.MODALITIES)
  pool = moiie_routing.Pool(modalities=tuple(n for n, _ in counts),
                            experts=tuple(c for _, c in counts), shared=moiie_cfg.shared)
  return MoIIESpec(pool=pool, mlp_dim=moiie_cfg.mlp_dim, k=moiie_cfg.k,
                   every=moiie_cfg.every, jitter=moiie_cfg.jitter,
                   load_balance_coef=moiie_cfg.load_balance_coef, grouped_impl=grouped_impl)


class MoIIEFFN(nnx.Module):
  """Per-modality routers over one stacked expert list; `__call__(x [B, T, D], modality
  [B, T], rng) -> (y [B, T, D], metrics)`."""

  def __init__(self, spec: MoIIESpec, *, embed_dim: int, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.spec = spec
    self.dtype = dtype  # compute dtype of the expert matmuls
    # Every modality's router side by side: modality m's is columns pool.router_cols(m).
    self.router = partitioning.param(rngs, nnx.initializers.normal(embed_dim ** -0.5 * 0.1),
                                     (embed_dim, spec.pool.router_width), ('embed', None),
                                     param_dtype)
    self.experts = Experts(num_experts=spec.pool.num_experts, embed_dim=embed_dim,
                           mlp_dim=spec.mlp_dim, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs, grouped_impl=spec.grouped_impl)

  def __call__(self, x_BTD, modality_BT, rng=None):
    """`rng` (training only) drives the router jitter; None = deterministic routing. One
    routing group per sequence (token choice: the group only sizes the dispatch)."""
    if modality_BT is None:
      raise ValueError("MoIIE routes by modality: the batch needs its 'modality' ids")
    spec = self.spec
    T = x_BTD.shape[1]
    r_in = x_BTD.astype(jnp.float32)
    key = routing.key_of(rng)
    if key is not None and spec.jitter > 0:
      r_in = routing.jitter(r_in, key, spec.jitter)
    logits = jnp.einsum('BTD,DR->BTR', r_in, self.router[...].astype(jnp.float32))
    route, metrics = moiie_routing.route(spec.pool, logits, modality_BT, k=spec.k,
                                         load_balance_coef=spec.load_balance_coef)
    y, stats = moe_layer.run_experts(x_BTD, route, self.experts, dropless=True, capacity=T,
                                     dtype=self.dtype)
    # load [M, E]: the fraction of modality m's tokens expert e processed (a row sums to k)
    metrics.update(expert_load=stats['expert_load'], load=modality_lib.load_by_modality(
        route, modality_BT, jnp.ones_like(modality_BT, bool), len(spec.pool.modalities)))
    return constrain(y, ('batch', 'length', 'act_embed')), metrics


class MoIIEBlock(dense.Block):
  """dense.Block with a MoIIE FFN, which routes by the tokens' modality."""

  def __call__(self, x_BTD, rope_sin_cos, rng=None, *, modality=None, causal=False):
    del causal  # token choice is causal already
    h = x_BTD + self.attn(self.attn_norm(x_BTD), rope_sin_cos)
    y, aux = self.ffn(self.ffn_norm(h), modality, rng)
    return h + y, aux

  def decode(self, x_BSD, rope_sin_cos, *, modality, cache, index):
    """The block on S new tokens (models/generate.py): each token is routed alone, so the
    FFN is the full pass's on the new tokens -> (y, cache)."""
    a, cache = self.attn.decode(self.attn_norm(x_BSD), rope_sin_cos, cache, index)
    h = x_BSD + a
    return h + self.ffn(self.ffn_norm(h), modality)[0], cache


def block(spec, layer: int, rngs):
  if not spec.ext.is_moe_layer(layer):
    return dense.Block(spec, rngs=rngs)
  dtype, pdtype = layers.dtype_of(spec.dtype), layers.dtype_of(spec.param_dtype)
  return MoIIEBlock(spec, ffn=MoIIEFFN(spec.ext, embed_dim=spec.embed_dim, dtype=dtype,
                                       param_dtype=pdtype, rngs=rngs), rngs=rngs)


def ffn_params(spec: MoIIESpec, embed_dim: int, active: bool) -> float:
  """One MoIIE FFN. Active: the k experts a token visits and its modality's router (D x C_m,
  averaged over modalities); all: every expert and every router."""
  pool, d = spec.pool, embed_dim
  expert = 3 * d * spec.mlp_dim
  if not active:
    return pool.num_experts * expert + d * pool.router_width
  M = len(pool.modalities)
  return spec.k * expert + d * pool.router_width / M


def layer_params(spec, layer: int, active: bool) -> float:
  if not spec.ext.is_moe_layer(layer):
    return dense.layer_params(spec, layer, active)
  return family_lib.attention_and_norm_params(spec) + ffn_params(spec.ext, spec.embed_dim,
                                                                  active)


def layer_summary(spec, layer: int) -> str:
  """The run log's per-layer table (training/flops.py): what the layer's FFN is."""
  if not spec.ext.is_moe_layer(layer):
    return f'dense F={spec.mlp_dim}'
  pool = spec.ext.pool
  own = '+'.join(f'{n}{m[0]}' for m, n in zip(pool.modalities, pool.experts))
  return f'moiie E={pool.num_experts} ({own}+{pool.shared}s) k={spec.ext.k} F={spec.ext.mlp_dim}'


def validate(config, sizes) -> None:
  """One-line errors before anything is built."""
  mm = config.model.moiie
  for key in ('mlp_dim', 'k', 'every'):
    if not isinstance(mm[key], int) or isinstance(mm[key], bool) or mm[key] <= 0:
      raise ValueError(f'config.model.moiie.{key} must be a positive integer, got {mm[key]!r}')
  if not isinstance(mm.shared, int) or isinstance(mm.shared, bool) or mm.shared < 0:
    raise ValueError(f'config.model.moiie.shared must be an integer >= 0, got {mm.shared!r}')
  if not 0.0 <= mm.jitter < 1.0:
    raise ValueError(f'config.model.moiie.jitter must be in [0, 1), got {mm.jitter!r}')
  if not mm.load_balance_coef >= 0:
    raise ValueError(f'config.model.moiie.load_balance_coef must be >= 0, got '
                     f'{mm.load_balance_coef!r}')
  spec = spec_from_config(mm)  # parses groups: clear errors
  pool = spec.pool
  for m, name in enumerate(pool.modalities):
    n = len(pool.candidates(m))
    if mm.k > n:
      raise ValueError(f'config.model.moiie.k={mm.k} is above the {n} candidates of modality '
                       f'{name!r} ({pool.experts[m]} {name} experts + {pool.shared} shared)')
  if mm.every > config.model.num_layers:
    raise ValueError(f'config.model.moiie.every={mm.every} leaves no MoIIE layer among '
                     f'model.num_layers={config.model.num_layers}')
  if pool.num_experts % sizes['expert']:
    raise ValueError(f'MoIIE has {pool.num_experts} experts a layer (groups={mm.groups!r} + '
                     f'shared={pool.shared}), not divisible by mesh.expert={sizes["expert"]}')
  if mm.mlp_dim % sizes['tensor']:
    raise ValueError(f"config.model.moiie.mlp_dim={mm.mlp_dim} is not divisible by "
                     f"mesh.tensor={sizes['tensor']}")


# ---------------------------------------------------------------------------
# Upcycling from a dense model (training/warm_start.py `upcycle_from=DIR`).

SHAPE_KEYS = ('num_layers', 'embed_dim', 'num_heads', 'num_kv_heads', 'head_dim',
              'vocab_size', 'num_modalities', 'mlp_dim')


def check_compatible(src_spec, new_spec) -> None:
  """ValueError naming every mismatch between a dense source and a MoIIE DecoderSpec."""
  source_kind(src_spec)
  if not isinstance(new_spec.ext, MoIIESpec):
    raise ValueError('this upcycling builds a MoIIE model: set model.family=moiie')
  problems = [f'model.{k}: source {getattr(src_spec, k)} vs {getattr(new_spec, k)}'
              for k in SHAPE_KEYS if getattr(src_spec, k) != getattr(new_spec, k)]
  if new_spec.ext.mlp_dim != src_spec.mlp_dim:
    problems.append(f'model.moiie.mlp_dim={new_spec.ext.mlp_dim} (each expert) must equal '
                    f'the dense FFN width {src_spec.mlp_dim}')
  if problems:
    raise ValueError('cannot upcycle this dense source into MoIIE: ' + '; '.join(problems))


def upcycle_pure(src_spec, src: dict, new_spec, new: dict) -> dict:
  """`upcycle` on nested pure dicts (`nnx.to_pure_dict`)."""
  check_compatible(src_spec, new_spec)
  E = new_spec.ext.pool.num_experts
  cast_like = upcycle_lib.cast_like
  out = {key: cast_like(src[key], value) for key, value in new.items() if key != 'blocks'}
  out['blocks'] = {}
  for i in range(new_spec.num_layers):
    s, n = src['blocks'][i], new['blocks'][i]
    block_ = {key: cast_like(s[key], value) for key, value in n.items() if key != 'ffn'}
    if new_spec.ext.is_moe_layer(i):  # every expert a copy of the dense FFN; fresh router
      experts = {name: jnp.broadcast_to(s['ffn'][name][None], (E,) + s['ffn'][name].shape)
                 .astype(w.dtype) for name, w in n['ffn']['experts'].items()}
      block_['ffn'] = {**n['ffn'], 'experts': experts}
    else:
      block_['ffn'] = cast_like(s['ffn'], n['ffn'])
    out['blocks'][i] = block_
  return out


def source_kind(spec) -> str:
  """'dense'; ValueError for any other source (models/upcycle.py's interface)."""
  if spec.family != 'dense':
    raise ValueError(f'MoIIE upcycles a dense model, got a source of model.family='
                     f'{spec.family!r}')
  return 'dense'


def describe_target(spec) -> str:
  """The upcycled model, for the run log."""
  pool = spec.ext.pool
  own = ' + '.join(f'{n} {m}' for m, n in zip(pool.modalities, pool.experts))
  return (f'MoIIE experts {own} + {pool.shared} shared, top-{spec.ext.k} per modality '
          'router: every expert a copy of its layer\'s dense FFN (step 0 computes the source '
          f'model)')


def start_warnings(spec) -> list[str]:
  """Nothing to warn about: the fresh routers' softmax spreads tokens over the copies."""
  del spec
  return []


def upcycle(src_spec, src_params, new_spec, new_params):
  """A MoIIE model's params from a dense model's: every expert of layer i a copy of the dense
  FFN of layer i, attention, norms, embeddings and LM head copied, routers from `new_params`
  (a fresh init). `src_params`, `new_params`: `nnx.State`s (or pure dicts) of
  `Decoder(src_spec)` and `Decoder(new_spec)`; returns `new_params`'s form. Pure and
  jit-able (shapes decide everything); ValueError first when the specs do not fit."""
  check_compatible(src_spec, new_spec)
  return upcycle_lib.in_form_of(upcycle_pure, src_spec, src_params, new_spec, new_params)


FAMILY = family_lib.Family(
    name='moiie',
    spec_fields=lambda model_cfg, stage: {'ext': spec_from_config(model_cfg.moiie,
                                                                  model_cfg.grouped_impl)},
    block=block,
    layer_params=layer_params,
    validate=validate,
    expert_names=lambda spec: spec.ext.pool.names(),
    layer_summary=layer_summary,
    upcycler=types.SimpleNamespace(
        check_compatible=check_compatible, start_warnings=start_warnings, upcycle=upcycle,
        source_kind=source_kind, describe_target=describe_target),
)
