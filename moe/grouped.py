"""Grouped SwiGLU over rows sorted by expert: the compute of the dropless path.

Rows [N, D] are sorted by expert; group j is the next `group_sizes[j]` rows. Two kernels:

  'ragged_dot'  `jax.lax.ragged_dot`: a grouped-matmul kernel on GPU/TPU (FLOPs ~ N·D·F).
                XLA:CPU lowers it to a masked dense product over all E experts (E x the
                FLOPs), so it is not used there by default.
  'blocks'      MegaBlocks-style: each group is padded to a multiple of `block` rows, the
                padded rows are cut into blocks that each belong to one expert, and a
                `lax.scan` over blocks runs one [block, D] x [D, F] SwiGLU per block with
                that expert's weights. FLOPs ~ (N + E·block)·D·F: near dense cost on CPU.

'auto' picks 'ragged_dot' on GPU/TPU and 'blocks' on CPU. Both compute the same function
(tests/test_dispatch.py compares them with the per-token reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ('auto', 'ragged_dot', 'blocks')


def _swiglu_ragged(x, w_gate, w_up, w_down, sizes):
  gate = jax.lax.ragged_dot(x, w_gate, sizes)
  up = jax.lax.ragged_dot(x, w_up, sizes)
  return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, sizes)


def _swiglu_blocks(x_ND, w_gate, w_up, w_down, sizes_E, block: int):
  N, D = x_ND.shape
  E = sizes_E.shape[0]
  block = max(1, min(block, N))
  num_blocks = -(-N // block) + E  # enough for N rows plus each group's padding
  padded_sizes = -(-sizes_E // block) * block  # [E]
  starts = jnp.cumsum(sizes_E) - sizes_E  # group start in the sorted rows
  padded_starts = jnp.cumsum(padded_sizes) - padded_sizes  # group start in padded rows
  row = jnp.arange(N)
  group = jnp.searchsorted(jnp.cumsum(sizes_E), row, side='right')  # E for spare rows
  in_group = group < E
  g = jnp.minimum(group, E - 1)
  dest = jnp.where(in_group, padded_starts[g] + row - starts[g], num_blocks * block)
  xp = jnp.zeros((num_blocks * block, D), x_ND.dtype).at[dest].set(x_ND, mode='drop')
  block_start = jnp.arange(num_blocks) * block
  block_expert = jnp.searchsorted(jnp.cumsum(padded_sizes), block_start, side='right')
  block_used = block_expert < E  # trailing blocks belong to no expert: skipped
  block_expert = jnp.minimum(block_expert, E - 1)

  def one_block(_, inputs):
    xb, e, used = inputs
    def run(xb):
      h = jax.nn.silu(xb @ w_gate[e]) * (xb @ w_up[e])
      return h @ w_down[e]
    yb = jax.lax.cond(used, run, jnp.zeros_like, xb)
    return None, yb

  _, yp = jax.lax.scan(one_block, None, (xp.reshape(num_blocks, block, D), block_expert,
                                         block_used))
  yp = yp.reshape(num_blocks * block, D)
  return jnp.where(in_group[:, None], yp.at[dest].get(mode='fill', fill_value=0), 0)


def grouped_swiglu(x_ND: jax.Array, w_gate_EDF: jax.Array, w_up_EDF: jax.Array,
                   w_down_EFD: jax.Array, group_sizes_E: jax.Array, *, impl: str = 'auto',
                   block: int = 256) -> jax.Array:
  """SwiGLU of expert j on its group of rows; rows past sum(group_sizes) come out 0."""
  if impl not in IMPLS:
    raise ValueError(f'grouped matmul impl {impl!r} is not one of {IMPLS}')
  if impl == 'auto':
    impl = 'blocks' if jax.default_backend() == 'cpu' else 'ragged_dot'
  sizes = group_sizes_E.astype(jnp.int32)
  if impl == 'ragged_dot':
    return _swiglu_ragged(x_ND, w_gate_EDF, w_up_EDF, w_down_EFD, sizes)
  return _swiglu_blocks(x_ND, w_gate_EDF, w_up_EDF, w_down_EFD, sizes, block)
