"""Modality-group routing (MoMa, models/moma.py): tokens partitioned by modality, each group
routed over its own experts, and the auxiliary routers that make it causal.

    1. tokens are partitioned by their modality id (deterministic, no parameters);
    2. inside group m, expert-choice routing over that group's experts E_m:
         s = sigmoid(x W_r[:, E_m])                         [G, S, |E_m|]   (float32)
         expert j takes the top C_m = ceil(S * c_m) tokens of modality m by s[:, j], of which
         the first ceil(b_m * c_m) count, b_m = number of modality-m tokens in the group;
         y_i = sum over experts j that took i of s[i, j] * FFN_j(x_i)    (not renormalised)
       A token no expert took gets 0 from the FFN and rides the residual. No balance loss.
       Or token choice inside the group (`router='topk'`): softmax over the group's experts,
       top-k, weights not renormalised, Switch load-balance loss per group.
    3. causal inference: each routed group's `AuxRouter` predicts, per token, which of its
       experts choose it; token i goes to expert j iff its aux score > 0.5, with the main
       router's sigmoid as the gate.

`route` returns the `(Routing, metrics)` of every router in moe/ (moe/routing.py): pairs
concatenated group after group over ONE stacked expert axis (group m owns experts
`offsets[m] : offsets[m] + E_m`), so dispatch, the grouped kernels and expert parallelism
serve it unchanged. The Routing carries the static bounds dispatch needs: one expert's
valid pairs (`max_per_expert`) and all valid pairs (`max_valid`) per routing group.

`spec` is any object with `groups` (Groups), `offsets`, `router` ('expert_choice' | 'topk'),
`k` and `load_balance_coef` (models/moma.MoMaSpec). Ties: the lower token index wins.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from core import partitioning
from moe.routing import Routing

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


class AuxRouter(nnx.Module):
  """Causal router `sigmoid(SiLU(x W1) W2)`, W1 [D, D/2], W2 [D/2, n]; returns the logits."""

  def __init__(self, embed_dim: int, num_out: int, *, param_dtype, rngs: nnx.Rngs):
    hidden = max(1, embed_dim // 2)
    self.w1 = partitioning.param(rngs, partitioning.fan_in_init(embed_dim), (embed_dim, hidden),
                           ('embed', 'mlp'), param_dtype)
    self.w2 = partitioning.param(rngs, partitioning.fan_in_init(hidden), (hidden, num_out),
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


def _group_pairs(group: Group, offset: int, logits_GSE, member_GS, spec,
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


def _max_valid(spec, parts: list[_Pairs], S: int) -> int:
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


def route(spec, logits_GSE, modality_GS, member_GS, aux_logits=None):
  """Routing of all groups -> (Routing with its static bounds, {'aux_loss'}).

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
                   valid=valid, num_experts=E, group_size=S,
                   max_per_expert=max(p.per_expert for p in parts),
                   max_valid=_max_valid(spec, parts, S))
  return route_, {'aux_loss': sum((p.aux_loss for p in parts), jnp.zeros((), jnp.float32))}


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
