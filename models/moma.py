"""MoMa: modality-aware mixture of experts (Lin et al. 2024, arXiv 2407.21770).

The FFN of every layer is a set of expert groups, one per modality (plus, optionally, a
shared pool any modality may use: the MoIIE form). Routing is hierarchical: tokens are
partitioned by modality, then expert-choice routing runs inside each modality's group (the
formulas are in moe/modality.py, which owns the routing); a token no expert took gets 0 from
the FFN and rides the residual. No balance loss.

All groups' experts live in ONE stacked `Experts` [E_total, D, F] (group m owns the slice
`offsets[m] : offsets[m] + E_m`), and the routing (moe/modality.py, which owns it with the
auxiliary routers) produces ordinary `moe.routing.Routing` pairs, so dispatch, the
grouped-matmul kernels and expert parallelism of moe/ serve MoMa unchanged
(`moe.layer.run_experts`). The static capacity C_m = ceil(S * c_m) bounds b_m * c_m, so
shapes are static while the number of tokens each expert takes follows the paper exactly.

Choices the paper leaves open, made here (each documented in docs/moma.md):
  - routing group: `group_sequences` consecutive sequences (default 1: a sequence). It is a
    property of the data, so the function does not depend on the mesh.
  - ties: the lower token index wins (`lax.top_k`).
  - a group with one expert and c >= 1 is not routed: every token of the modality goes
    through it with weight 1 (so `1t1i` is exactly the modality-untied FFN).
  - Gumbel-sigmoid noise (upcycling): s = sigmoid(l + G' - G''), G' - G'' ~ Logistic(0, 1),
    during training only, used for both the choice and the gate value.
  - token-choice inside groups (`router='topk'`): softmax over the group's experts, top-k,
    weights not renormalised, Switch load-balance loss per group.

Causal inference (auxiliary routers): expert choice looks at the whole group, so at decode
time it would see the future. Each routed group has an `AuxRouter` predicting, per token,
which of its experts choose it: `sigmoid(SiLU(x W1) W2)`, trained in a second stage with
BCE against the batch selections (`train_aux`). With `causal=True` token i goes to expert j
iff its aux score > 0.5, with the main router's sigmoid as the gate value.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from core import layers, partitioning
from data import tokenizer
from models import family as family_lib
from models import mod as mod_lib
from moe import layer as moe_layer
from moe import routing
from moe.experts import Experts
from moe.modality import SHARED, AuxRouter, Group, load_by_modality, route, selection

ROUTERS = ('expert_choice', 'topk')
NORMS = ('res_post', 'pre')


@dataclasses.dataclass(frozen=True)
class MoMaSpec:
  """Settings of the MoMa FFN of every layer (built from `config.model.moma`)."""
  groups: tuple[Group, ...]
  mlp_dim: int  # F of each expert
  router: str = 'expert_choice'  # 'expert_choice' | 'topk' (token choice inside groups)
  k: int = 1  # experts per token, topk only
  group_sequences: int = 1  # sequences per routing group
  gumbel: bool = False  # Gumbel-sigmoid routing noise during training (upcycling)
  load_balance_coef: float = 0.01  # topk only
  norm: str = 'res_post'  # 'res_post': h = x + Norm(f(x)) | 'pre': h = x + f(Norm(x))
  train_aux: bool = False  # compute the auxiliary routers' BCE (stage 'aux')

  @property
  def num_experts(self) -> int:
    return sum(g.experts for g in self.groups)

  @property
  def offsets(self) -> tuple[int, ...]:
    return tuple(sum(g.experts for g in self.groups[:i]) for i in range(len(self.groups)))

  def expert_names(self) -> list[str]:
    """'text/0', ..., 'image/3', ('shared/0', ...): one per stacked expert."""
    return [f'{g.name}/{j}' for g in self.groups for j in range(g.experts)]

  def aux_groups(self) -> tuple[int, ...]:
    """Indices of the groups with an auxiliary router (expert-choice routed groups)."""
    if self.router != 'expert_choice':
      return ()
    return tuple(i for i, g in enumerate(self.groups) if g.routed)


def parse_groups(text: str, modalities: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
  """'4t4i' or '4text4image' -> (('text', 4), ('image', 4)), in modality-id order.

  Each part is a count and a modality name or an unambiguous prefix of one; every modality
  needs at least one expert.
  """
  parts = re.findall(r'(\d+)([a-z]+)', text)
  if not parts or ''.join(n + m for n, m in parts) != text:
    raise ValueError(f'model.moma.groups={text!r} is not like "4t4i" (experts per modality, '
                     f'modalities {modalities})')
  counts: dict[str, int] = {}
  for n, prefix in parts:
    names = [m for m in modalities if m.startswith(prefix)]
    if len(names) != 1:
      raise ValueError(f'model.moma.groups={text!r}: {prefix!r} names '
                       f'{"no" if not names else "more than one"} modality of {modalities}')
    if names[0] in counts:
      raise ValueError(f'model.moma.groups={text!r} names {names[0]!r} twice')
    if int(n) < 1:
      raise ValueError(f'model.moma.groups={text!r}: {names[0]!r} needs at least one expert')
    counts[names[0]] = int(n)
  missing = [m for m in modalities if m not in counts]
  if missing:
    raise ValueError(f'model.moma.groups={text!r} gives no experts to {missing}')
  return tuple((m, counts[m]) for m in modalities)


class MoMaFFN(nnx.Module):
  """Modality-grouped experts; `__call__(x [B, T, D], modality [B, T]) -> (y, aux)`."""

  def __init__(self, spec: MoMaSpec, *, embed_dim: int, num_modalities: int, dtype,
               param_dtype, rngs: nnx.Rngs):
    self.spec = spec
    self.num_modalities = num_modalities
    self.dtype = dtype
    self.router = partitioning.param(rngs, nnx.initializers.normal(embed_dim ** -0.5 * 0.1),
                               (embed_dim, spec.num_experts), ('embed', None), param_dtype)
    self.experts = Experts(num_experts=spec.num_experts, embed_dim=embed_dim,
                           mlp_dim=spec.mlp_dim, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
    self.aux_routers = nnx.List([
        AuxRouter(embed_dim, spec.groups[i].experts, param_dtype=param_dtype, rngs=rngs)
        for i in spec.aux_groups()])

  def __call__(self, x_BTD, modality_BT, *, member_BT=None, rng=None, causal=False):
    """`member_BT` (bool) marks the tokens this layer processes (all by default); `rng`
    (training) drives Gumbel noise; `causal` routes with the auxiliary routers."""
    spec = self.spec
    B, T, D = x_BTD.shape
    n = spec.group_sequences if B % spec.group_sequences == 0 else 1
    G, S = B // n, n * T
    x = x_BTD.reshape(G, S, D)
    modality = modality_BT.reshape(G, S)
    member = (jnp.ones((G, S), bool) if member_BT is None
              else member_BT.reshape(G, S).astype(bool))
    logits = jnp.einsum('GSD,DE->GSE', x.astype(jnp.float32),
                        self.router[...].astype(jnp.float32))
    key = routing.key_of(rng)
    if key is not None and spec.gumbel:
      logits = logits + jax.random.logistic(key, logits.shape, jnp.float32)
    aux_logits = None
    if self.aux_routers and (causal or spec.train_aux):
      x_aux = jax.lax.stop_gradient(x)  # the aux routers never train the main model
      aux_logits = {i: r(x_aux) for i, r in zip(spec.aux_groups(), self.aux_routers)}
    route_, route_metrics = route(spec, logits, modality, member,
                                  aux_logits if causal else None)
    y, stats = moe_layer.run_experts(x, route_, self.experts, dropless=True,
                                     capacity=route_.max_per_expert, dtype=self.dtype,
                                     max_valid=route_.max_valid)
    metrics = {'aux_loss': route_metrics['aux_loss'], 'expert_load': stats['expert_load'],
               'load': load_by_modality(route_, modality, member, self.num_modalities)}
    if spec.train_aux and not causal and aux_logits:
      metrics.update(self._aux_router_loss(route_, aux_logits, member, modality))
    return y.reshape(B, T, D), metrics

  def _aux_router_loss(self, route_, aux_logits, member_GS, modality_GS):
    """BCE of each aux router against the batch expert-choice selections (its group's
    member tokens x its experts), averaged over groups; plus the agreement rate."""
    target = jax.lax.stop_gradient(selection(route_))
    losses, agree = [], []
    for i, logits in aux_logits.items():
      group, offset = self.spec.groups[i], self.spec.offsets[i]
      t = target[..., offset:offset + group.experts]
      w = (member_GS & jnp.isin(modality_GS, jnp.asarray(group.modalities)))[..., None]
      w = jnp.broadcast_to(w, t.shape).astype(jnp.float32)
      denom = jnp.maximum(jnp.sum(w), 1.0)
      losses.append(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, t) * w) / denom)
      agree.append(jnp.sum(((logits > 0) == (t > 0)) * w) / denom)
    return {'aux_router_loss': sum(losses) / len(losses),
            'aux_router_accuracy': sum(agree) / len(agree)}


def check_spec(spec: MoMaSpec, *, expert_shards: int) -> None:
  """Clear errors before anything is built."""
  if spec.router not in ROUTERS:
    raise ValueError(f'model.moma.router={spec.router!r} is not one of {ROUTERS}')
  if spec.norm not in NORMS:
    raise ValueError(f'model.moma.norm={spec.norm!r} is not one of {NORMS}')
  for g in spec.groups:
    if g.experts < 1:
      raise ValueError(f'model.moma group {g.name!r} needs at least one expert')
    if not 0 < g.capacity <= 1:
      raise ValueError(f'model.moma capacity of group {g.name!r} must be in (0, 1], got '
                       f'{g.capacity}')
  if spec.router == 'topk' and not 1 <= spec.k:
    raise ValueError(f'model.moma.k={spec.k} must be >= 1')
  if spec.num_experts % expert_shards:
    raise ValueError(f'MoMa has {spec.num_experts} experts in all ({spec.expert_names()}), '
                     f'not divisible by mesh.expert={expert_shards}')


class MoMaBlock(nnx.Module):
  """Shared global attention + MoMa FFN, optionally inside a mixture-of-depths router.

  res_post (the paper's form): h = x + Norm(Attn(x)), y = h + Norm(MoMa(h)).
  pre:                         h = x + Attn(Norm(x)), y = h + MoMa(Norm(h)).
  `decoder_spec` is a `models.transformer.DecoderSpec` with `moma` (and maybe `mod`) set.
  """

  def __init__(self, decoder_spec, layer: int, *, num_modalities: int, rngs: nnx.Rngs):
    spec = decoder_spec
    self.spec = spec.moma
    dtype, pdtype = layers.dtype_of(spec.dtype), layers.dtype_of(spec.param_dtype)
    D = spec.embed_dim
    self.attn_norm = layers.RMSNorm(D, param_dtype=pdtype, rngs=rngs)
    self.attn = layers.Attention(
        embed_dim=D, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, implementation=spec.attention_impl, dtype=dtype,
        param_dtype=pdtype, rngs=rngs, gate=spec.attn_gate)
    self.ffn_norm = layers.RMSNorm(D, param_dtype=pdtype, rngs=rngs)
    self.ffn = MoMaFFN(spec.moma, embed_dim=D, num_modalities=num_modalities, dtype=dtype,
                       param_dtype=pdtype, rngs=rngs)
    self.mod = (mod_lib.MoD(spec.mod, embed_dim=D, param_dtype=pdtype, rngs=rngs,
                            aux_router=AuxRouter(D, 1, param_dtype=pdtype, rngs=rngs))
                if spec.mod is not None and spec.mod.is_mod_layer(layer) else None)

  def _layer(self, x, attend, modality, member, rng=None, causal=False):
    """Attention (`attend(h)`: the full pass's or the cached one) and the MoMa FFN."""
    if self.spec.norm == 'res_post':
      h = x + self.attn_norm(attend(x))
      f, aux = self.ffn(h, modality, member_BT=member, rng=rng, causal=causal)
      return h + self.ffn_norm(f), aux
    h = x + attend(self.attn_norm(x))
    f, aux = self.ffn(self.ffn_norm(h), modality, member_BT=member, rng=rng, causal=causal)
    return h + f, aux

  def __call__(self, x_BTD, sin_cos, rng=None, *, modality, causal=False):
    if self.mod is None:
      return self._layer(x_BTD, lambda h: self.attn(h, sin_cos), modality, None, rng, causal)
    layer_fn = lambda x, sc, m, member, mask: self._layer(  # noqa: E731
        x, lambda h: self.attn(h, sc, mask), m, member, rng, causal)
    return self.mod(layer_fn, x_BTD, sin_cos, modality, causal=causal,
                    train_aux=self.spec.train_aux)

  def init_cache(self, batch: int, max_len: int) -> dict:
    cache = self.attn.init_cache(batch, max_len)
    if self.mod is not None:  # which positions this MoD layer processed (its only keys)
      cache['selected'] = mod_lib.init_selected(batch, max_len)
    return cache

  def decode(self, x_BSD, sin_cos, *, modality, cache, index):
    """The block on S new tokens with the causal routing (aux routers, MoD per token) and
    the layer's cache (models/generate.py) -> (y, cache)."""
    new = {}

    def attend(h, key_mask=None):
      a, new['cache'] = self.attn.decode(h, sin_cos, cache, index, key_mask)
      return a
    if self.mod is None:
      y, _ = self._layer(x_BSD, attend, modality, None, None, causal=True)
      return y, new['cache']
    layer_fn = lambda x, member, key_mask: self._layer(  # noqa: E731
        x, lambda h: attend(h, key_mask), modality, member, None, causal=True)[0]
    y, selected = self.mod.decode(layer_fn, x_BSD, cache['selected'], index)
    return y, {**new['cache'], 'selected': selected}


# ---------------------------------------------------------------------------
# The MoMa family (models/family.py): config -> spec, parameters, checks.


def moma_spec_from_config(moma_cfg, *, train_aux: bool = False) -> MoMaSpec:
  """config.model.moma -> MoMaSpec: expert groups in modality-id order, then the shared
  (MoIIE) pool if any. capacity '' = 1 / experts of the group (the paper's c_e)."""
  names = tokenizer.MODALITIES
  counts = parse_groups(moma_cfg.groups, names)
  cap = lambda n, c: float(c) if str(c) != '' else 1.0 / n  # noqa: E731
  groups = [Group(name, n, cap(n, moma_cfg.capacity), (i,))
            for i, (name, n) in enumerate(counts)]
  if moma_cfg.shared_experts:
    groups.append(Group(SHARED, moma_cfg.shared_experts,
                        cap(moma_cfg.shared_experts, moma_cfg.shared_capacity),
                        tuple(range(len(names)))))
  return MoMaSpec(
      groups=tuple(groups), mlp_dim=moma_cfg.mlp_dim, router=moma_cfg.router, k=moma_cfg.k,
      group_sequences=moma_cfg.group_sequences, gumbel=moma_cfg.gumbel,
      load_balance_coef=moma_cfg.load_balance_coef, norm=moma_cfg.norm,
      train_aux=train_aux)


def mod_spec_from_config(mod_cfg) -> mod_lib.MoDSpec | None:
  if not mod_cfg.enabled:
    return None
  return mod_lib.MoDSpec(capacity=mod_cfg.capacity, every=mod_cfg.every, scale=mod_cfg.scale)


def _spec_fields(model_cfg, stage: str) -> dict:
  return {'moma': moma_spec_from_config(model_cfg.moma, train_aux=stage == 'aux'),
          'mod': mod_spec_from_config(model_cfg.moma.mod)}


def ffn_params(spec: MoMaSpec, embed_dim: int, active: bool) -> float:
  """One MoMa FFN. Active: a token of modality m goes through c_m * E_m experts of its group
  on average (1 with the default c), plus c_s * E_s of the shared pool. Aux routers are not
  active (they only run at causal inference)."""
  d, expert = embed_dim, 3 * embed_dim * spec.mlp_dim
  if not active:
    aux = sum(d * (d // 2) + (d // 2) * spec.groups[j].experts for j in spec.aux_groups())
    return spec.num_experts * expert + d * spec.num_experts + aux
  per_token = lambda g: ((spec.k if spec.router == 'topk' else g.capacity * g.experts)  # noqa: E731
                         if g.routed else 1)
  mod_groups = [g for g in spec.groups if g.name != SHARED]
  shared = sum(per_token(g) for g in spec.groups if g.name == SHARED)
  routed = (sum(per_token(g) for g in mod_groups) / len(mod_groups) + shared) * expert
  return routed + d * spec.num_experts


def _is_mod(spec, layer: int) -> bool:
  return spec.mod is not None and spec.mod.is_mod_layer(layer)


def _layer_params(spec, layer: int, active: bool) -> float:
  """Attention, norms and the MoMa FFN; a MoD layer is active for a fraction c_d of the
  tokens and adds its router (D x 1) and aux router (D x D/2 + D/2)."""
  d = spec.embed_dim
  n = family_lib.attention_and_norm_params(spec) + ffn_params(spec.moma, d, active)
  if _is_mod(spec, layer):
    n = n * spec.mod.capacity + d if active else n + d + d * (d // 2) + d // 2
  return n


def _attention_keys(spec, layer: int, seq_len: int) -> float:
  """A MoD layer's k = round(c_d T) tokens attend over each other: k^2 / T per token."""
  if _is_mod(spec, layer):
    k = spec.mod.num_selected(seq_len)
    return k * k / seq_len
  return float(seq_len)


def _matmul_params(spec, layer: int, active_params: float) -> float:
  share = spec.mod.capacity if _is_mod(spec, layer) else 1.0  # a MoD layer's norms: c_d
  return active_params - 2 * spec.embed_dim * share


def validate_block(mm, config, sizes, key: str = 'model.moma') -> MoMaSpec:
  """The MoMa FFN block `mm` (config.<key>: the MoMa family's, or a hybrid's) -> its spec,
  or one ValueError naming the key at fault. MoD is the caller's (it needs the layers)."""
  for name in ('mlp_dim', 'k', 'group_sequences'):
    if not isinstance(mm[name], int) or mm[name] <= 0:
      raise ValueError(f'config.{key}.{name} must be a positive integer, got {mm[name]!r}')
  if not isinstance(mm.shared_experts, int) or mm.shared_experts < 0:
    raise ValueError(f'config.{key}.shared_experts must be >= 0, got {mm.shared_experts!r}')
  for name in ('capacity', 'shared_capacity'):
    if str(mm[name]) != '':
      try:
        float(mm[name])
      except ValueError:
        raise ValueError(f"config.{key}.{name}={mm[name]!r} is not a number or ''") from None
  try:
    spec = moma_spec_from_config(mm)  # parses groups: clear errors
    check_spec(spec, expert_shards=sizes['expert'])
  except ValueError as e:  # their messages name the MoMa family's keys
    raise ValueError(str(e).replace('model.moma', key)) from None
  if mm.mlp_dim % sizes['tensor']:
    raise ValueError(f"config.{key}.mlp_dim={mm.mlp_dim} is not divisible by "
                     f"mesh.tensor={sizes['tensor']}")
  shards = sizes['data'] * sizes['fsdp'] * sizes['expert']
  if config.batch_size % mm.group_sequences or (
      config.batch_size // mm.group_sequences) % shards:
    raise ValueError(f'config.{key}.group_sequences={mm.group_sequences}: the '
                     f'batch of {config.batch_size} must split into routing groups that '
                     f'split over the {shards} batch shards')
  return spec


def _validate(config, sizes) -> None:
  mm = config.model.moma
  spec = validate_block(mm, config, sizes)
  if mm.mod.enabled:
    mod_lib.check_spec(mod_spec_from_config(mm.mod))
  if config.get('stage', 'main') == 'aux' and not spec.aux_groups() and not mm.mod.enabled:
    raise ValueError(f"config.stage='aux' trains auxiliary routers, but groups="
                     f"{mm.groups!r} with router={mm.router!r} and no MoD has none")


FAMILY = family_lib.Family(
    name='moma',
    spec_fields=_spec_fields,
    block=lambda spec, layer, rngs: MoMaBlock(spec, layer, num_modalities=spec.num_modalities,
                                              rngs=rngs),
    layer_params=_layer_params,
    validate=_validate,
    attention_keys=_attention_keys,
    matmul_params=_matmul_params,
    expert_names=lambda spec: spec.moma.expert_names(),
    stages=('main', 'aux'),
    evaluators=('lm', 'causal', 'generation'),
)
