"""Expert parallelism: experts live on the devices of the mesh axis `expert`; tokens travel.
(Also `batch_parallel_dropless`, at the end: a dropless layer on a mesh without expert
parallelism, each device on its own groups.)

Two paths, both one `jax.shard_map` over the whole mesh (groups G split over data x fsdp x
expert like the batch; expert weights [E, D, F] over ('expert', 'fsdp', 'tensor'), gathered
over 'fsdp' inside, hidden F split over 'tensor' + psum).

Padded (`expert_parallel_swiglu`; capacity dispatch, and dropless on CPU). Capacity-padded
buffers `[E, G, C, D]` come out of dispatch sharded like the batch; on each device:

    all_to_all over 'expert' (split E, concat G)  -> [E / n, G_local * n, C, D]
    its own experts
    all_to_all back (split G, concat E)           -> [E, G_local, C, D]

Static shapes, so it works on every backend. A dropless layer uses it with capacity = the
worst case (every token of a group at one expert): exact, but it moves and computes
E x the rows of the real pairs' worth.

Ragged (`ragged_expert_parallel`; dropless on GPU/TPU). Only the real rows travel:

    local valid pairs [N = G_local * P] --stable sort by expert (invalid last)--> rows [N, D]
      counts [E] --all_gather over 'expert'--> [n, E]: every send / receive size and offset
      --ragged all-to-all--> [n * N, D] (worst case; chunk from device s, sorted by expert)
      --sort by local expert--> grouped SwiGLU (moe/grouped.py) --unsort-->
      --ragged all-to-all back--> [N, D] in the sorted order of the pairs
      --weighted scatter-add (float32)--> y [G_local, S, D]  (psum over 'tensor')

The exchange is injectable: `jax.lax.ragged_all_to_all` (compiles on GPU/TPU; XLA:CPU only
lowers it; see RAGGED_EP for a GPU caveat) or `emulated_ragged_all_to_all`, the same semantics from `all_to_all` of padded
chunks, which runs everywhere (tests; CPU). `RAGGED_EP` picks the path (`ragged_exchange`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from core import partitioning
from moe import dispatch, grouped
from moe.routing import Routing

# Dropless layers under expert parallelism, read by moe/layer.py: run_experts:
#   'auto'     jax.lax.ragged_all_to_all on RAGGED_BACKENDS, the padded all_to_all path
#              elsewhere (CPU). The padded path computes E x the real rows for a dropless
#              layer; the ragged one only the real rows, but on one H100 (jax 0.11.2, forced
#              with expert=1) XLA's collective took ~50 ms for 32 MB (docs/moe.md). Multi-GPU
#              hosts: compare with benchmarks/ragged_ep.py, and set 'off' if padded wins.
#   'on'       jax.lax.ragged_all_to_all on every backend (lowers on CPU, does not compile)
#   'emulate'  the ragged path with emulated_ragged_all_to_all (any backend; tests)
#   'off'      the padded path
RAGGED_EP = 'auto'
RAGGED_MODES = ('auto', 'on', 'emulate', 'off')
RAGGED_BACKENDS = ('gpu', 'cuda', 'rocm', 'tpu')


def expert_axis_size() -> int:
  """Size of the mesh axis 'expert' in the current mesh context (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or 'expert' not in mesh.axis_names:
    return 1
  return mesh.shape['expert']


def _weight_specs():
  """Specs of w_gate, w_up [E, D, F] and w_down [E, F, D], sharded as the rules table says:
  over ('expert', 'fsdp', 'tensor') and ('expert', 'tensor', 'fsdp')."""
  in_w = partitioning.logical_to_spec(('expert', 'embed', 'mlp'))
  return in_w, in_w, partitioning.logical_to_spec(('expert', 'mlp', 'embed'))


def _dropless_in_specs():
  """in_specs of the dropless shard_maps: x [G, S, D] and the routing's token, expert, weight
  and valid [G, P] split like the batch, then the three expert weights."""
  pair = partitioning.logical_to_spec(('batch', None))
  return (partitioning.logical_to_spec(('batch', None, None)), pair, pair, pair, pair,
          *_weight_specs())


def _gather_experts(wg, wu, wd, dtype):
  """Inside a shard_map: the expert weights whole over 'fsdp' (their embed axis), in `dtype`.
  Gathered in float32, then cast, so their gradients' reduce-scatter stays float32."""
  return (jax.lax.all_gather(wg, 'fsdp', axis=1, tiled=True).astype(dtype),
          jax.lax.all_gather(wu, 'fsdp', axis=1, tiled=True).astype(dtype),
          jax.lax.all_gather(wd, 'fsdp', axis=2, tiled=True).astype(dtype))


def expert_parallel_swiglu(buffers_EGCD: jax.Array, w_gate_EDF: jax.Array,
                           w_up_EDF: jax.Array, w_down_EFD: jax.Array, dtype) -> jax.Array:
  """SwiGLU expert j applied to buffers[j], with experts sharded over 'expert'.

  Must run under a mesh context (`jax.set_mesh`). Weights arrive sharded as the rules table
  says: [E, D, F] over ('expert', 'fsdp', 'tensor'), [E, F, D] over ('expert', 'tensor',
  'fsdp'). Output: [E, G, C, D] sharded like the input buffers.
  """
  buf_spec = partitioning.logical_to_spec((None, 'batch', None, None))

  def local(buf, wg, wu, wd):
    wg, wu, wd = _gather_experts(wg, wu, wd, dtype)
    x = jax.lax.all_to_all(buf, 'expert', split_axis=0, concat_axis=1, tiled=True)
    x = x.astype(dtype)
    h = jax.nn.silu(jnp.einsum('EGCD,EDF->EGCF', x, wg)) * jnp.einsum('EGCD,EDF->EGCF', x, wu)
    y = jax.lax.psum(jnp.einsum('EGCF,EFD->EGCD', h, wd), 'tensor')  # F split over tensor
    return jax.lax.all_to_all(y, 'expert', split_axis=1, concat_axis=0, tiled=True)

  return jax.shard_map(local, in_specs=(buf_spec, *_weight_specs()), out_specs=buf_spec)(
      buffers_EGCD, w_gate_EDF, w_up_EDF, w_down_EFD)


def ragged_exchange():
  """The exchange `RAGGED_EP` asks for on this backend; None = use the padded path."""
  if RAGGED_EP not in RAGGED_MODES:
    raise ValueError(f'moe.parallel.RAGGED_EP={RAGGED_EP!r} is not one of {RAGGED_MODES}')
  if RAGGED_EP == 'off':
    return None
  if RAGGED_EP == 'emulate':
    return emulated_ragged_all_to_all
  if RAGGED_EP == 'on' or jax.default_backend() in RAGGED_BACKENDS:
    return jax.lax.ragged_all_to_all
  return None


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name, axis_index_groups=None):
  """`jax.lax.ragged_all_to_all` (same arguments, same result) from a padded all_to_all.

  Slice i = operand[input_offsets[i] : + send_sizes[i]] goes to device i // (K / n) of
  `axis_name` (K slices, n devices) and is written there at output_offsets[i] (an offset in
  the RECEIVER's buffer); the receiver writes recv_sizes[i'] rows of its incoming slice i'.
  Every slice travels padded to L = min(len(operand), len(output)) rows, so this moves
  K * L rows where the real collective moves sum(send_sizes). Differentiable (gather,
  all_to_all and scatter are).
  """
  if axis_index_groups is not None:
    raise NotImplementedError('emulated_ragged_all_to_all: axis_index_groups')
  n = jax.lax.axis_size(axis_name)
  K = input_offsets.shape[0]
  if K % n:
    raise ValueError(f'{K} slices do not split over the {n} devices of {axis_name!r}')
  N, M = operand.shape[0], output.shape[0]
  r = jnp.arange(min(N, M), dtype=jnp.int32)
  src_KL = jnp.where(r < send_sizes[:, None], input_offsets[:, None] + r, N)
  chunks = operand.at[src_KL].get(mode='fill', fill_value=0)  # [K, L, ...]
  chunks = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # slice i' from i' // (K/n)
  offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  dst_KL = jnp.where(r < recv_sizes[:, None], offsets[:, None] + r, M)  # M: not written
  return output.at[dst_KL].set(chunks.astype(output.dtype), mode='drop')


def _exclusive_cumsum(a, axis=-1):
  return jnp.cumsum(a, axis=axis) - a


def ragged_expert_parallel(x_GSD: jax.Array, route: Routing, w_gate_EDF: jax.Array,
                           w_up_EDF: jax.Array, w_down_EFD: jax.Array, dtype, *,
                           exchange=jax.lax.ragged_all_to_all, impl: str = 'auto'):
  """Dropless MoE with experts sharded over 'expert', moving only the real rows.

  y [G, S, D] (x.dtype) = sum over valid pairs of weight * FFN_expert(x[token]), the same
  function as `moe.dispatch.dropless_dispatch_combine`; returns (y, stats) with the same
  stats (dropped_fraction = 0, expert_load [E]). Must run under a mesh context with an
  'expert' axis; G must split over data x fsdp x expert. Weights are sharded as in
  `expert_parallel_swiglu`. `exchange` has the signature of `jax.lax.ragged_all_to_all`
  (see `emulated_ragged_all_to_all`). The grouped matmul is moe/grouped.py's (`impl`:
  'auto': ragged_dot on TPU, padded blocks on GPU and CPU). Rows travel in `dtype`; the combine
  accumulates in float32.
  """
  G, S, D = x_GSD.shape
  E = route.num_experts
  n = expert_axis_size()
  if E % n:
    raise ValueError(f'{E} experts do not split over mesh axis expert={n}')
  El = E // n  # experts per device
  assert route.group_size == S and route.token.shape[0] == G, (route.token.shape, S)

  def local(x, token_GP, expert_GP, weight_GP, valid_GP, wg, wu, wd):
    g = x.shape[0]  # local groups
    N = token_GP.size  # local pairs
    me = jax.lax.axis_index('expert')
    # Local pairs sorted by expert (stable; invalid pairs last, in no expert's group).
    valid = valid_GP.reshape(-1)
    key = jnp.where(valid, expert_GP.reshape(-1).astype(jnp.int32), E)
    order = jnp.argsort(key, stable=True)
    valid_s = valid[order]
    flat_token = (token_GP.astype(jnp.int32)
                  + S * jnp.arange(g, dtype=jnp.int32)[:, None]).reshape(-1)
    token_s = jnp.where(valid_s, flat_token[order], 0)
    rows = x.astype(dtype).reshape(g * S, D)[token_s]  # [N, D], by expert

    # Sizes and offsets of every chunk, from the counts of all devices of this expert group:
    # sizes[s, t] = rows device s sends to device t (the owner of experts t*El ... +El).
    counts_E = jnp.bincount(key, length=E + 1)[:E].astype(jnp.int32)
    counts_nE = jax.lax.all_gather(counts_E, 'expert')  # [n, E], row s = device s
    sizes = counts_nE.reshape(n, n, El).sum(-1)
    send_sizes, recv_sizes = sizes[me], sizes[:, me]
    send_offsets = _exclusive_cumsum(sizes, axis=1)  # [s, t]: chunk s->t in s's rows
    recv_offsets = _exclusive_cumsum(sizes, axis=0)  # [s, t]: chunk s->t in t's buffer
    M = n * N  # worst case: every pair of every device goes to this one
    buf = exchange(rows, jnp.zeros_like(rows, shape=(M, D)),
                   send_offsets[me], send_sizes, recv_offsets[me], recv_sizes,
                   axis_name='expert')

    # Received: chunk from device s at recv_offsets[s, me], itself sorted by expert. Sort
    # the rows by local expert (stable: source-major within an expert); spare rows last.
    wg, wu, wd = _gather_experts(wg, wu, wd, dtype)
    local_counts = jax.lax.dynamic_slice_in_dim(counts_nE, me * El, El, axis=1)  # [n, El]
    row = jnp.arange(M, dtype=jnp.int32)
    src = jnp.searchsorted(jnp.cumsum(recv_sizes), row, side='right')  # n: spare row
    src_c = jnp.minimum(src, n - 1)
    pos = row - recv_offsets[src_c, me]  # row within its chunk
    local_e = jnp.sum(pos[:, None] >= jnp.cumsum(local_counts, axis=1)[src_c], axis=1)
    order_l = jnp.argsort(jnp.where(src < n, local_e, El), stable=True)
    out = grouped.grouped_swiglu(buf[order_l], wg, wu, wd, local_counts.sum(0), impl=impl)
    out = jnp.zeros_like(out).at[order_l].set(out)  # back to the received order

    # Send every row back to where it came from: the reverse of the first exchange.
    back = exchange(out, jnp.zeros_like(out, shape=(N, D)),
                    recv_offsets[:, me], recv_sizes, send_offsets[:, me], send_sizes,
                    axis_name='expert')
    weight_s = jnp.where(valid, weight_GP.reshape(-1).astype(jnp.float32), 0.0)[order]
    contrib = jnp.where(valid_s[:, None], back.astype(jnp.float32) * weight_s[:, None], 0.0)
    y = jnp.zeros((g * S, D), jnp.float32).at[jnp.where(valid_s, token_s, g * S)].add(
        contrib, mode='drop')
    y = jax.lax.psum(y, 'tensor')  # hidden F was split over 'tensor': partial sums
    return y.reshape(g, S, D).astype(x.dtype)

  y = jax.shard_map(
      local, in_specs=_dropless_in_specs(), out_specs=partitioning.logical_to_spec(('batch', None, None)))(x_GSD, route.token, route.expert, route.weight, route.valid,
                        w_gate_EDF, w_up_EDF, w_down_EFD)
  return y, dispatch.dropless_stats(route)


def batch_parallel_applies(num_groups: int) -> bool:
  """Whether `batch_parallel_dropless` runs here: a mesh context of more than one device,
  not inside another shard_map, whose batch axes (data x fsdp x expert) split the G routing
  groups evenly (then no group spans two devices)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return False
  return num_groups % partitioning.batch_shards(mesh) == 0


def batch_parallel_dropless(x_GSD: jax.Array, route: Routing, w_gate_EDF: jax.Array,
                            w_up_EDF: jax.Array, w_down_EFD: jax.Array, dtype, *,
                            impl: str = 'auto', max_valid: int | None = None):
  """The dropless layer without expert parallelism (mesh axis `expert` = 1) on a mesh:
  `dispatch.dropless_dispatch_combine`'s function, (y [G, S, D] in x.dtype, stats), with
  each device sorting and computing only its own groups.

  Under plain jit the dropless path's argsort runs over the pairs of ALL groups, so XLA
  gathers every device's pairs, and the sorted rows [G*P, D] of the global batch (with
  float32 all-reduces of that size over 'fsdp') live on every device: memory and traffic
  of the MoE layers grow with the number of batch shards (docs/moe.md). Here one
  `jax.shard_map` over the whole mesh, as `ragged_expert_parallel` (`partitioning.per_shard`,
  over the axes of size > 1 only, trips the manual-axis type check in the kernels'
  searchsorted): groups split like the batch, expert weights gathered over 'fsdp' inside
  (FSDP) and then cast to `dtype`, hidden F split over 'tensor' + a float32 psum.
  `batch_parallel_applies` checks that no routing group spans two devices, so the result
  equals the single-device one.
  """
  E = route.num_experts
  S = x_GSD.shape[1]

  def local(x, token_GP, expert_GP, weight_GP, valid_GP, wg, wu, wd):
    wg, wu, wd = _gather_experts(wg, wu, wd, dtype)
    r = Routing(token_GP, expert_GP, weight_GP, valid_GP, num_experts=E, group_size=S)
    y = dispatch.dropless_sum(
        x, r, lambda rows, sizes: grouped.grouped_swiglu(rows, wg, wu, wd, sizes, impl=impl),
        dtype, max_valid=max_valid)
    return jax.lax.psum(y, 'tensor').astype(x.dtype)  # hidden F split over 'tensor'

  y = jax.shard_map(
      local, in_specs=_dropless_in_specs(), out_specs=partitioning.logical_to_spec(('batch', None, None)))(x_GSD, route.token, route.expert, route.weight, route.valid,
                        w_gate_EDF, w_up_EDF, w_down_EFD)
  return y, dispatch.dropless_stats(route)
