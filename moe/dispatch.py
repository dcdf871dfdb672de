"""Dispatch and combine: from a `Routing` to expert inputs, and from expert outputs to y.

Both paths compute, for every routing group g and token s (pairs p of group g),

    y[g, s] = sum over p with token[g, p] = s, valid[g, p], kept[g, p] of
              weight[g, p] * FFN_{expert[g, p]}(x[g, s])

Dropless path: kept = True. Capacity path (capacity C per expert per group): pairs are
admitted first-come in pair order,

    slot[g, p] = #{q < p : valid[g, q] and expert[g, q] = expert[g, p]},  kept = valid & slot < C,

so a router sets priorities just by ordering its pairs. Dropped pairs contribute nothing; a
token whose pairs are all dropped gets exactly 0 (the layer's residual carries it). Invalid
pairs take no slot and contribute nothing (nor gradient), whatever their token, expert and
weight hold (out-of-range indices and NaN weights included).

Capacity path, E leading so that expert parallelism can put an all_to_all on it:

    x [G, S, D] --gather--> buffers [E, G*C, D] --expert_fn--> [E, G*C, D] --scatter-add--> y

  expert_fn contract: [E, G*C, D] -> [E, G*C, D]; row j of buffers[e] is slot c = j % C of
  group g = j // C. Row e must go through expert e; rows are independent (empty slots hold
  zeros and whatever comes out for them is ignored). `Experts.dense_apply` satisfies it, and
  so does an all_to_all(E -> devices) + dense_apply + all_to_all back.
  `capacity_dispatch` and `capacity_combine` are the two halves, for that split.

  Index form, not one-hot masks: the dispatch einsum `GSEC,GSD->EGCD` (and the combine
  einsum) cost 2*S*E*C*D = 2*k*c*S^2*D FLOPs per group, quadratic in S; at S=8192, k=2,
  c=1.25, D=512, E=8, F=2048 the two einsums would cost ~2.7x the expert matmuls. The gather
  / scatter-add below move O(E*C*D) values and are exact (no 0*x products; buffers are
  filled by a gather, whose gradient is a scatter-add into x).

Dropless path: all valid pairs of all groups (G*P rows, static) are sorted by expert
(stable; invalid pairs sort last and belong to no expert), tokens are gathered in that order,
`Experts.ragged_apply` runs the grouped matmuls, and a weighted scatter-add sends each row
straight to its token (this is the un-sort and the combine in one step).

Both paths are differentiable in x, routing.weight and the expert parameters, work under
jit, cast x to the compute dtype before the gather, accumulate the combine in float32 and
return y in x.dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from moe.experts import Experts
from moe.routing import Routing


@flax.struct.dataclass
class CapacityInfo:
  """What `capacity_combine` needs, slot-major (buffers row (e, g, c))."""
  token_EGC: jax.Array  # int32 [E, G, C]: token (in its group) in the slot; S = empty slot
  weight_EGC: jax.Array  # float32 [E, G, C]: combine weight of the slot; 0 if empty
  valid_E: jax.Array  # int32 [E]: valid pairs per expert before capacity (for stats)
  group_size: int = flax.struct.field(pytree_node=False)  # S
  out_dtype: np.dtype = flax.struct.field(pytree_node=False)  # dtype of y (= x.dtype)


def _admit(routing: Routing, capacity: int):
  """First-come slots: (slot [G, P], kept [G, P], valid pairs per expert [E])."""
  onehot = (jax.nn.one_hot(routing.expert, routing.num_experts, dtype=jnp.int32)
            * routing.valid[..., None].astype(jnp.int32))  # [G, P, E], 0 rows if invalid
  earlier = jnp.cumsum(onehot, axis=1) - onehot  # valid earlier pairs of each expert
  slot = jnp.sum(earlier * onehot, axis=-1)
  kept = routing.valid & (slot < capacity)
  return slot, kept, jnp.sum(onehot, axis=(0, 1))


def capacity_dispatch(x_GSD: jax.Array, routing: Routing, capacity: int, *,
                      dtype=None) -> tuple[jax.Array, CapacityInfo]:
  """Expert buffers [E, G*C, D] (in `dtype`, default x.dtype) and the combine info.

  `capacity` (C) is a static int: slots per expert per group.
  """
  G, S, D = x_GSD.shape
  E, C = routing.num_experts, int(capacity)
  assert routing.group_size == S and routing.token.shape[0] == G, (routing.token.shape, S)
  slot, kept, valid_E = _admit(routing, C)
  g = jnp.broadcast_to(jnp.arange(G, dtype=jnp.int32)[:, None], slot.shape)
  e = jnp.where(kept, routing.expert, 0)
  c = jnp.where(kept, slot, C)  # C is out of range: dropped/invalid pairs are not written
  token_EGC = jnp.full((E, G, C), S, jnp.int32).at[e, g, c].set(
      routing.token.astype(jnp.int32), mode='drop')
  weight_EGC = jnp.zeros((E, G, C), jnp.float32).at[e, g, c].add(
      routing.weight.astype(jnp.float32), mode='drop')
  x = x_GSD if dtype is None else x_GSD.astype(dtype)
  # Empty slots hold token S (out of range): the gather fills them with zeros.
  buffers = x.at[jnp.arange(G)[None, :, None], token_EGC].get(mode='fill', fill_value=0)
  info = CapacityInfo(token_EGC=token_EGC, weight_EGC=weight_EGC, valid_E=valid_E,
                      group_size=S, out_dtype=np.dtype(x_GSD.dtype))
  return buffers.reshape(E, G * C, D), info


def capacity_combine(out_EXD: jax.Array, info: CapacityInfo) -> jax.Array:
  """Expert outputs [E, G*C, D] -> y [G, S, D]: y[g, token] += weight * out[e, g, slot]."""
  E, G, C = info.token_EGC.shape
  S, D = info.group_size, out_EXD.shape[-1]
  assert out_EXD.shape == (E, G * C, D), (out_EXD.shape, (E, G * C, D))
  out = out_EXD.reshape(E, G, C, D).astype(jnp.float32) * info.weight_EGC[..., None]
  y = jnp.zeros((G, S, D), jnp.float32).at[jnp.arange(G)[None, :, None], info.token_EGC].add(
      out, mode='drop')  # empty slots (token S) are dropped, whatever the expert returned
  return y.astype(info.out_dtype)


def capacity_stats(info: CapacityInfo) -> dict[str, jax.Array]:
  """dropped_fraction: valid pairs dropped by capacity / valid pairs (0 if none valid);
  expert_fill [E]: used slots / (G*C); expert_load [E]: share of valid pairs per expert."""
  E, G, C = info.token_EGC.shape
  kept_E = jnp.sum(info.token_EGC < info.group_size, axis=(1, 2))
  num_valid = jnp.sum(info.valid_E)
  denom = jnp.maximum(num_valid, 1).astype(jnp.float32)
  return {
      'dropped_fraction': (num_valid - jnp.sum(kept_E)).astype(jnp.float32) / denom,
      'expert_fill': kept_E.astype(jnp.float32) / (G * C),
      'expert_load': info.valid_E.astype(jnp.float32) / denom,
  }


def capacity_dispatch_combine(x_GSD: jax.Array, routing: Routing,
                              expert_fn: Callable[[jax.Array], jax.Array], capacity: int, *,
                              dtype=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Capacity-based MoE: (y [G, S, D] in x.dtype, stats). See the module docstring for the
  admission rule and the expert_fn contract; `dtype` casts the buffers (pass the experts'
  compute dtype to halve an expert-parallel all_to_all in bfloat16)."""
  buffers, info = capacity_dispatch(x_GSD, routing, capacity, dtype=dtype)
  return capacity_combine(expert_fn(buffers), info), capacity_stats(info)


def dropless_dispatch_combine(x_GSD: jax.Array, routing: Routing, experts: Experts, *,
                              max_valid: int | None = None
                              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Dropless MoE with sort + ragged_dot: (y [G, S, D] in x.dtype, stats).

  `max_valid`: a static bound on the valid pairs of one group, when the router guarantees
  one below P (MoMa's groups: about S, with P = modalities x S). After the sort the valid
  pairs come first, so only the first G * max_valid rows are gathered, computed and
  scattered. The bound must hold: valid pairs past it would be lost.

  stats: dropped_fraction (always 0, for parity with the capacity path) and expert_load [E]
  (share of valid pairs per expert).
  """
  assert experts.num_experts == routing.num_experts, (experts.num_experts, routing.num_experts)
  y = dropless_sum(x_GSD, routing, experts.ragged_apply, experts.dtype, max_valid=max_valid)
  return y.astype(x_GSD.dtype), dropless_stats(routing)


def dropless_sum(x_GSD: jax.Array, routing: Routing, apply, dtype, *,
                 max_valid: int | None = None) -> jax.Array:
  """The dropless path's y [G, S, D] in float32: the valid pairs of all G groups sorted by
  expert, `apply(rows [N, D] in dtype, group_sizes [E]) -> [N, D]` (a grouped SwiGLU) on
  them, and the weighted scatter-add back to the tokens. Also the per-device body of
  moe/parallel.py's `batch_parallel_dropless`, where G is one device's groups."""
  G, S, D = x_GSD.shape
  E = routing.num_experts
  assert routing.group_size == S and routing.token.shape[0] == G, (routing.token.shape, S)
  valid = routing.valid.reshape(-1)  # [G*P]
  flat_token = (routing.token.astype(jnp.int32)
                + S * jnp.arange(G, dtype=jnp.int32)[:, None]).reshape(-1)
  key = jnp.where(valid, routing.expert.reshape(-1).astype(jnp.int32), E)  # invalid last
  order = jnp.argsort(key, stable=True)
  if max_valid is not None and G * max_valid < order.shape[0]:
    order = order[:G * max_valid]  # valid pairs sort first
  group_sizes = jnp.bincount(key, length=E + 1)[:E].astype(jnp.int32)
  valid_s = valid[order]
  token_s = jnp.where(valid_s, flat_token[order], 0)
  rows = x_GSD.astype(dtype).reshape(G * S, D)[token_s]  # [G*P, D], sorted
  out = apply(rows, group_sizes)
  weight_s = jnp.where(valid, routing.weight.reshape(-1).astype(jnp.float32), 0.0)[order]
  # `where`, not a product: rows of invalid pairs belong to no expert group.
  contrib = jnp.where(valid_s[:, None], out.astype(jnp.float32) * weight_s[:, None], 0.0)
  y = jnp.zeros((G * S, D), jnp.float32).at[jnp.where(valid_s, token_s, G * S)].add(
      contrib, mode='drop')
  return y.reshape(G, S, D)


def dropless_stats(routing: Routing) -> dict[str, jax.Array]:
  """dropped_fraction (0) and expert_load [E]: each expert's share of the valid pairs."""
  E = routing.num_experts
  key = jnp.where(routing.valid, routing.expert, E).reshape(-1)
  load_E = jnp.bincount(key, length=E + 1)[:E].astype(jnp.float32)
  return {'dropped_fraction': jnp.zeros((), jnp.float32),
          'expert_load': load_E / jnp.maximum(jnp.sum(load_E), 1.0)}
