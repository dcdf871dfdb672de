"""MoMa: modality-aware mixture of experts (Lin et al. 2024, arXiv 2407.21770).

The FFN of every layer is a set of expert groups, one per modality (plus, optionally, a
shared pool any modality may use: the MoIIE form). Routing is hierarchical:

    1. tokens are partitioned by their modality id (deterministic, no parameters);
    2. inside group m, expert-choice routing over that group's experts E_m:
         s = sigmoid(x W_r[:, E_m])                         [G, S, |E_m|]   (float32)
         expert j takes the top C_m = ceil(S * c_m) tokens of modality m by s[:, j], of which
         the first ceil(b_m * c_m) count, b_m = number of modality-m tokens in the group;
         y_i = sum over experts j that took i of s[i, j] * FFN_j(x_i)    (not renormalised)
       A token no expert took gets 0 from the FFN and rides the residual. No balance loss.

All groups' experts live in ONE stacked `Experts` [E_total, D, F] (group m owns the slice
`offsets[m] : offsets[m] + E_m`), and routing produces ordinary `moe.routing.Routing` pairs,
so dispatch, the grouped-matmul kernels and expert parallelism of moe/ serve MoMa unchanged
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
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models import layers, mod as mod_lib
from moe import layer as moe_layer
from moe.experts import Experts
from moe.routing import Routing

ROUTERS = ('expert_choice', 'topk')
NORMS = ('res_post', 'pre')
SHARED = 'shared'  # name of the MoIIE pool group


@dataclasses.dataclass(frozen=True)
class Group:
  """One expert group: its experts serve the tokens of `modalities` (ids)."""
  name: str  # modality name, or 'shared' for the MoIIE pool
  experts: int  # E_m
  capacity: float  # c_m: fraction of the group's tokens each expert takes
  modalities: tuple[int, ...]  # modality ids whose tokens are members

  @property
  def routed(self) -> bool:
    return not (self.experts == 1 and self.capacity >= 1)


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


class AuxRouter(nnx.Module):
  """Causal router `sigmoid(SiLU(x W1) W2)`, W1 [D, D/2], W2 [D/2, n]; returns the logits."""

  def __init__(self, embed_dim: int, num_out: int, *, param_dtype, rngs: nnx.Rngs):
    hidden = max(1, embed_dim // 2)
    self.w1 = layers.param(rngs, layers.fan_in_init(embed_dim), (embed_dim, hidden),
                           ('embed', 'mlp'), param_dtype)
    self.w2 = layers.param(rngs, layers.fan_in_init(hidden), (hidden, num_out),
                           ('mlp', None), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return jax.nn.silu(x32 @ self.w1[...].astype(jnp.float32)) @ self.w2[...].astype(
        jnp.float32)


class _Pairs(NamedTuple):
  """One group's routing pairs [G, P_m] and what bounds them."""
  token: jax.Array
  expert: jax.Array
  weight: jax.Array
  valid: jax.Array
  per_expert: int  # static bound on one expert's valid pairs in a routing group
  per_token: float  # valid pairs of the group <= per_token * b_m + extra (b_m: members)
  extra: int
  aux_loss: jax.Array


def _group_pairs(group: Group, offset: int, logits_GSE, member_GS, spec: MoMaSpec,
                 aux_logits_GSE) -> _Pairs:
  """The pairs of one group (untied, causal from its aux router, token choice, or expert
  choice) with their static bounds and the group's aux loss (top-k load balance)."""
  G, S, _ = logits_GSE.shape
  n = group.experts
  cols = logits_GSE[..., offset:offset + n]  # [G, S, n]
  tokens = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :], (G, S))
  zero = jnp.zeros((), jnp.float32)
  if not group.routed:  # the modality's own FFN: every member token, weight 1
    return _Pairs(tokens, jnp.full((G, S), offset, jnp.int32), jnp.ones((G, S), jnp.float32),
                  member_GS, S, 1.0, 0, zero)
  if aux_logits_GSE is not None or spec.router == 'topk':
    if aux_logits_GSE is not None:  # causal: each token decides alone, from its aux router
      chosen = aux_logits_GSE > 0  # aux sigmoid > 0.5
      weight = jax.nn.sigmoid(cols)
      k = n
      expert = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (G, S, n))
      aux_loss = zero
    else:  # token choice among the group's experts
      k = min(spec.k, n)
      probs = jax.nn.softmax(cols, axis=-1)
      weight, expert = jax.lax.top_k(probs, k)  # [G, S, k]
      chosen = jnp.ones((G, S, k), bool)
      aux_loss = spec.load_balance_coef * _load_balance(probs, expert, member_GS)
    pairs = lambda a: a.reshape(G, S * k)
    return _Pairs(pairs(jnp.repeat(tokens[..., None], k, axis=-1)), pairs(expert + offset),
                  pairs(weight), pairs(chosen & member_GS[..., None]), S, float(k), 0,
                  aux_loss)
  # Expert choice: expert j takes the top ceil(b_m * c) member tokens by its column, so the
  # group holds n * ceil(b_m c) <= n c b_m + n valid pairs.
  cap = min(S, math.ceil(S * group.capacity - 1e-6))
  masked = jnp.where(member_GS[..., None], cols, -jnp.inf)
  _, token = jax.lax.top_k(jnp.swapaxes(masked, 1, 2), cap)  # [G, n, C]
  weight = jnp.take_along_axis(jnp.swapaxes(jax.nn.sigmoid(cols), 1, 2), token, axis=2)
  b = jnp.sum(member_GS, axis=1).astype(jnp.float32)  # [G]
  quota = jnp.ceil(b * group.capacity - 1e-6).astype(jnp.int32)
  rank = jnp.arange(cap, dtype=jnp.int32)
  valid = (rank[None, None, :] < quota[:, None, None]) & jnp.take_along_axis(
      jnp.broadcast_to(member_GS[:, None, :], (G, n, S)), token, axis=2)
  expert = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :, None] + offset, token.shape)
  flat = lambda a: a.reshape(G, n * cap)
  return _Pairs(flat(token), flat(expert), flat(weight), flat(valid), cap,
                n * group.capacity, n, zero)


def _load_balance(probs_GSn, expert_GSk, member_GS):
  """Switch loss inside one group, over its member tokens: n * sum_j f_j * P_j."""
  n = probs_GSn.shape[-1]
  w = member_GS.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(w), 1.0)
  top1 = jax.nn.one_hot(expert_GSk[..., 0], n, dtype=jnp.float32)
  f = jnp.einsum('GSn,GS->n', top1, w) / count
  p = jnp.einsum('GSn,GS->n', probs_GSn, w) / count
  return n * jnp.sum(f * p)


def _max_valid(spec: MoMaSpec, parts: list[_Pairs], S: int) -> int:
  """Static bound on the valid pairs of one routing group of S tokens.

  Groups with disjoint modality sets share the S tokens (sum of b_m = S), each holding at
  most per_token_m * b_m + extra_m valid pairs: together at most
  S * max(per_token_m) + sum(extra_m). A group of every modality (the shared pool) adds all
  its pairs. All pairs when groups overlap otherwise.
  """
  total = sum(p.token.shape[1] for p in parts)
  every = set().union(*(g.modalities for g in spec.groups))
  split = [(g, p) for g, p in zip(spec.groups, parts)
           if set(g.modalities) != every or len(spec.groups) == 1]
  pool = sum(p.token.shape[1] for g, p in zip(spec.groups, parts)
             if set(g.modalities) == every and len(spec.groups) > 1)
  mods = [m for g, _ in split for m in g.modalities]
  if len(mods) != len(set(mods)):
    return total
  bound = (math.floor(S * max(p.per_token for _, p in split) + 1e-6)
           + sum(p.extra for _, p in split) + pool)
  return min(bound, total)


def route(spec: MoMaSpec, logits_GSE, modality_GS, member_GS, aux_logits=None):
  """Routing of all groups -> (Routing, static bound on one expert's valid pairs per routing
  group, static bound on all valid pairs per routing group, aux loss).

  `aux_logits`: {group index: [G, S, E_m]} from the auxiliary routers (causal inference);
  None = batch routing. Pairs are concatenated group after group.
  """
  G, S, E = logits_GSE.shape
  parts = []
  for i, (group, offset) in enumerate(zip(spec.groups, spec.offsets)):
    member = member_GS & jnp.isin(modality_GS, jnp.asarray(group.modalities))
    aux = None if aux_logits is None else aux_logits.get(i)
    parts.append(_group_pairs(group, offset, logits_GSE, member, spec, aux))
  token, expert, weight, valid = (jnp.concatenate(a, axis=1) for a in zip(
      *[(p.token, p.expert, p.weight, p.valid) for p in parts]))
  route_ = Routing(token=token, expert=expert, weight=jnp.where(valid, weight, 0.0),
                   valid=valid, num_experts=E, group_size=S)
  return (route_, max(p.per_expert for p in parts), _max_valid(spec, parts, S),
          sum((p.aux_loss for p in parts), jnp.zeros((), jnp.float32)))


def selection(route_: Routing) -> jax.Array:
  """float32 [G, S, E]: 1 where expert e processes token s (the aux routers' target)."""
  G, P = route_.token.shape
  g = jnp.broadcast_to(jnp.arange(G)[:, None], (G, P))
  out = jnp.zeros((G, route_.group_size, route_.num_experts), jnp.float32)
  return jnp.minimum(out.at[g, route_.token, route_.expert].add(
      route_.valid.astype(jnp.float32)), 1.0)


def load_by_modality(route_: Routing, modality_GS, member_GS, num_modalities: int):
  """[M, E]: fraction of modality m's (member) tokens that expert e processed."""
  tok_mod = jnp.take_along_axis(modality_GS, route_.token, axis=1)  # [G, P]
  pairs = jnp.einsum('GPM,GPE->ME',
                     jax.nn.one_hot(tok_mod, num_modalities, dtype=jnp.float32)
                     * route_.valid[..., None],
                     jax.nn.one_hot(route_.expert, route_.num_experts, dtype=jnp.float32))
  counts = jnp.sum(jax.nn.one_hot(modality_GS, num_modalities, dtype=jnp.float32)
                   * member_GS[..., None], axis=(0, 1))
  return pairs / jnp.maximum(counts, 1.0)[:, None]


class MoMaFFN(nnx.Module):
  """Modality-grouped experts; `__call__(x [B, T, D], modality [B, T]) -> (y, aux)`."""

  def __init__(self, spec: MoMaSpec, *, embed_dim: int, num_modalities: int, dtype,
               param_dtype, rngs: nnx.Rngs):
    self.spec = spec
    self.num_modalities = num_modalities
    self.dtype = dtype
    self.router = layers.param(rngs, nnx.initializers.normal(embed_dim ** -0.5 * 0.1),
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
    if rng is not None and spec.gumbel:
      logits = logits + jax.random.logistic(rng, logits.shape, jnp.float32)
    aux_logits = None
    if self.aux_routers and (causal or spec.train_aux):
      x_aux = jax.lax.stop_gradient(x)  # the aux routers never train the main model
      aux_logits = {i: r(x_aux) for i, r in zip(spec.aux_groups(), self.aux_routers)}
    route_, per_expert, max_valid, aux_loss = route(spec, logits, modality, member,
                                                    aux_logits if causal else None)
    y, stats = moe_layer.run_experts(x, route_, self.experts, dropless=True,
                                     capacity=per_expert, dtype=self.dtype,
                                     max_valid=max_valid)
    metrics = {'aux_loss': aux_loss, 'expert_load': stats['expert_load'],
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
        param_dtype=pdtype, rngs=rngs)
    self.ffn_norm = layers.RMSNorm(D, param_dtype=pdtype, rngs=rngs)
    self.ffn = MoMaFFN(spec.moma, embed_dim=D, num_modalities=num_modalities, dtype=dtype,
                       param_dtype=pdtype, rngs=rngs)
    self.mod = (mod_lib.MoD(spec.mod, embed_dim=D, param_dtype=pdtype, rngs=rngs,
                            aux_router=AuxRouter(D, 1, param_dtype=pdtype, rngs=rngs))
                if spec.mod is not None and spec.mod.is_mod_layer(layer) else None)

  def _layer(self, x, sin_cos, modality, member, attn_mask, rng=None, causal=False):
    if self.spec.norm == 'res_post':
      h = x + self.attn_norm(self.attn(x, sin_cos, attn_mask))
      f, aux = self.ffn(h, modality, member_BT=member, rng=rng, causal=causal)
      return h + self.ffn_norm(f), aux
    h = x + self.attn(self.attn_norm(x), sin_cos, attn_mask)
    f, aux = self.ffn(self.ffn_norm(h), modality, member_BT=member, rng=rng, causal=causal)
    return h + f, aux

  def __call__(self, x_BTD, sin_cos, rng=None, *, modality, causal=False):
    if self.mod is None:
      return self._layer(x_BTD, sin_cos, modality, None, None, rng, causal)
    layer_fn = lambda x, sc, m, member, mask: self._layer(x, sc, m, member, mask, rng, causal)
    return self.mod(layer_fn, x_BTD, sin_cos, modality, causal=causal,
                    train_aux=self.spec.train_aux)
