"""Stacked SwiGLU experts: E independent FFNs whose weights share one leading `expert` axis.

Each expert j computes `FFN_j(x) = (silu(x W_gate[j]) * x W_up[j]) W_down[j]`, the same
SwiGLU as core/layers.py. Two ways to run all of them at once:

  dense_apply(x_ECD)             every expert on its own [C, D] buffer (one batched einsum
                                 over E); for capacity dispatch and expert parallelism.
  ragged_apply(x_ND, sizes_E)    rows sorted by expert, group j = the next sizes_E[j] rows;
                                 grouped matmuls (dropless path): moe/grouped.py picks
                                 `jax.lax.ragged_dot` on TPU and padded blocks on GPU and
                                 CPU (where XLA lowers ragged_dot to E x the FLOPs).

Parameters are stored in `param_dtype` and cast to `dtype` for the matmuls, as in
core/layers.py. The stacked axis carries the logical name 'expert' (mapped to the mesh
axis `expert` by core/partitioning.py). No activation sharding constraints are placed here:
these methods also run inside the expert-parallel shard_map, where the `expert` mesh axis is
manual and a constraint naming it would be rejected; the layout of the expert buffers is
decided by the caller (dispatch / parallel.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from core.partitioning import fan_in_init, param
from moe import grouped


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """One SwiGLU FFN: x [..., D], w_gate/w_up [D, F], w_down [F, D] -> [..., D].

  Computes in the dtypes it is given (cast before calling); used by the references in the
  tests and by always-on shared experts.
  """
  gate = jnp.einsum('...D,DF->...F', x, w_gate)
  up = jnp.einsum('...D,DF->...F', x, w_up)
  return jnp.einsum('...F,FD->...D', jax.nn.silu(gate) * up, w_down)


class Experts(nnx.Module):
  """E SwiGLU experts with stacked weights w_gate/w_up [E, D, F] and w_down [E, F, D]."""

  def __init__(self, *, num_experts: int, embed_dim: int, mlp_dim: int, dtype, param_dtype,
               rngs: nnx.Rngs, grouped_impl: str = 'auto'):
    self.num_experts = num_experts  # E
    self.embed_dim = embed_dim  # D
    self.mlp_dim = mlp_dim  # F, hidden width of EACH expert
    self.dtype = dtype  # compute dtype of the matmuls (outputs come back in it)
    self.grouped_impl = grouped_impl  # dropless kernel: 'auto' | 'ragged_dot' | 'blocks'
    # Same init as the dense SwiGLU (fan-in of one expert), so an upcycled copy of a dense
    # FFN and a freshly initialised expert have the same scale.
    self.w_gate = param(rngs, fan_in_init(embed_dim), (num_experts, embed_dim, mlp_dim),
                        ('expert', 'embed', 'mlp'), param_dtype)
    self.w_up = param(rngs, fan_in_init(embed_dim), (num_experts, embed_dim, mlp_dim),
                      ('expert', 'embed', 'mlp'), param_dtype)
    self.w_down = param(rngs, fan_in_init(mlp_dim), (num_experts, mlp_dim, embed_dim),
                        ('expert', 'mlp', 'embed'), param_dtype)

  def _weights(self):
    return tuple(w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))

  def dense_apply(self, x_ECD: jax.Array) -> jax.Array:
    """Expert j on its own rows x_ECD[j]: [E, C, D] -> [E, C, D] in the compute dtype.

    C is any row count (capacity, or groups x capacity); all-zero rows give zero outputs.
    """
    assert x_ECD.shape[0] == self.num_experts, (x_ECD.shape, self.num_experts)
    w_gate, w_up, w_down = self._weights()
    x = x_ECD.astype(self.dtype)
    gate = jnp.einsum('ECD,EDF->ECF', x, w_gate)
    up = jnp.einsum('ECD,EDF->ECF', x, w_up)
    return jnp.einsum('ECF,EFD->ECD', jax.nn.silu(gate) * up, w_down)

  def ragged_apply(self, x_ND: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """Grouped SwiGLU: rows [start_j, start_j + group_sizes_E[j]) go through expert j.

    x_ND [N, D] sorted by expert; group_sizes_E int32 [E] with sum <= N. Returns [N, D] in
    the compute dtype; rows past sum(group_sizes_E) belong to no expert and come out 0.
    The kernel is `self.grouped_impl` (moe/grouped.py: ragged_dot on TPU, batched blocks
    on GPU, a loop over blocks on CPU; XLA lowers ragged_dot to E x the FLOPs on both).
    """
    assert group_sizes_E.shape == (self.num_experts,), group_sizes_E.shape
    w_gate, w_up, w_down = self._weights()
    return grouped.grouped_swiglu(x_ND.astype(self.dtype), w_gate, w_up, w_down,
                                  group_sizes_E, impl=self.grouped_impl)
