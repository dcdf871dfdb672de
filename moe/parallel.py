"""Expert parallelism: experts live on the devices of the mesh axis `expert`; tokens travel.

Capacity-padded buffers `[E, G, C, D]` come out of dispatch sharded like the batch (G over
data x fsdp x expert). Inside `jax.shard_map` each device holds `[E, G_local, C, D]`:

    all_to_all over 'expert' (split E, concat G)  -> [E / n, G_local * n, C, D]
    its own experts (FSDP-gathered over 'fsdp', hidden split over 'tensor' + psum)
    all_to_all back (split G, concat E)           -> [E, G_local, C, D]

The buffers have static shapes, so this works on every backend (CPU included). A dropless
layer uses it with capacity = the worst case (every token of a group at one expert), which
keeps the function identical to the single-device dropless path; a ragged all-to-all that
moves only the real rows is where GPU/TPU backends can do better.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from training import sharding


def expert_axis_size() -> int:
  """Size of the mesh axis 'expert' in the current mesh context (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or 'expert' not in mesh.axis_names:
    return 1
  return mesh.shape['expert']


def expert_parallel_swiglu(buffers_EGCD: jax.Array, w_gate_EDF: jax.Array,
                           w_up_EDF: jax.Array, w_down_EFD: jax.Array, dtype) -> jax.Array:
  """SwiGLU expert j applied to buffers[j], with experts sharded over 'expert'.

  Must run under a mesh context (`jax.set_mesh`). Weights arrive sharded as the rules table
  says: [E, D, F] over ('expert', 'fsdp', 'tensor'), [E, F, D] over ('expert', 'tensor',
  'fsdp'). Output: [E, G, C, D] sharded like the input buffers.
  """
  buf_spec = sharding.logical_to_spec((None, 'batch', None, None))
  in_w = sharding.logical_to_spec(('expert', 'embed', 'mlp'))
  out_w = sharding.logical_to_spec(('expert', 'mlp', 'embed'))

  def local(buf, wg, wu, wd):
    wg = jax.lax.all_gather(wg, 'fsdp', axis=1, tiled=True).astype(dtype)
    wu = jax.lax.all_gather(wu, 'fsdp', axis=1, tiled=True).astype(dtype)
    wd = jax.lax.all_gather(wd, 'fsdp', axis=2, tiled=True).astype(dtype)
    x = jax.lax.all_to_all(buf, 'expert', split_axis=0, concat_axis=1, tiled=True)
    x = x.astype(dtype)
    h = jax.nn.silu(jnp.einsum('EGCD,EDF->EGCF', x, wg)) * jnp.einsum('EGCD,EDF->EGCF', x, wu)
    y = jax.lax.psum(jnp.einsum('EGCF,EFD->EGCD', h, wd), 'tensor')  # F split over tensor
    return jax.lax.all_to_all(y, 'expert', split_axis=1, concat_axis=0, tiled=True)

  return jax.shard_map(local, in_specs=(buf_spec, in_w, in_w, out_w), out_specs=buf_spec)(
      buffers_EGCD, w_gate_EDF, w_up_EDF, w_down_EFD)
