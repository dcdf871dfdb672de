"""Unsorted rows with a group id each (MoT's modality-untied projections, models/mot.py): a
counting sort straight into the grouped kernels' layout (moe/kernels.py), and the matmul and
SwiGLU of every group on its rows in that layout. One gather places the rows, one brings
them back (no argsort, and no scatter in either direction)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe import kernels
from moe.kernels import BLOCK


class RowsLayout(NamedTuple):
  """Where each of N rows sits in a kernel layout of P = num_blocks * block rows (groups
  contiguous, each padded to a multiple of `block`; block 1: the exact sorted order).
  Built once, it serves every grouped call over the same rows (MoT: all projections of a
  block), and values can stay in the layout between calls (`to_layout` / `from_layout`)."""
  dest: jax.Array  # [N] row -> slot (rows in no group: distinct out-of-range slots)
  src: jax.Array  # [P] slot -> row (padding slots: N, out of range)
  sizes: jax.Array  # [E] rows per group
  block_expert: jax.Array  # [num_blocks] each block's group (clipped to E - 1)
  num_used: jax.Array  # blocks holding rows: a prefix
  num_blocks: int
  block: int
  impl: str  # resolved kernel: 'ragged_dot' | 'tokamax' | 'blocks' | 'batched'

  def padded_sizes(self) -> jax.Array:
    """[E] slots per group: its rows rounded up to a multiple of `block`."""
    return -(-self.sizes // self.block) * self.block

  def single_group(self) -> 'RowsLayout':
    """The same slots as one group (a tied weight over every row of the layout): its size
    is the groups' padded total, so it spans their padding too."""
    return self._replace(sizes=jnp.sum(self.padded_sizes(), keepdims=True),
                         block_expert=jnp.zeros_like(self.block_expert))


def rows_layout(group_N: jax.Array, num_groups: int, *, impl: str = 'auto',
                block: int | None = None) -> RowsLayout:
  """Destination of each row in the kernel layout, from its group id (num_groups = none):
  rank within the group by a cumulative count (no argsort; the number of groups E is
  small), groups padded to multiples of `block`; ceil(N / block) + E - 1 blocks always
  suffice (sum_e ceil(n_e / block) <= ceil(N / block) + E - 1)."""
  impl = kernels.resolve(impl)
  group_N = group_N.astype(jnp.int32)
  N, E = group_N.shape[0], num_groups
  block = 1 if impl in kernels.RAGGED else max(1, min(block or BLOCK[impl], N))
  onehot = jax.nn.one_hot(group_N, E + 1, dtype=jnp.int32)
  rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - onehot, group_N[:, None], axis=1)[:, 0]
  sizes = jnp.sum(onehot, axis=0)[:E]
  padded = -(-sizes // block) * block
  padded_ends = jnp.cumsum(padded)
  num_blocks = -(-N // block) + (E - 1 if block > 1 else 0)
  in_group = group_N < E
  # Rows in no group get distinct out-of-range slots: every index is unique (faster scatter
  # and gather on CPU), and the out-of-range ones are dropped / read as 0.
  dest = jnp.where(in_group, (padded_ends - padded)[jnp.minimum(group_N, E - 1)] + rank,
                   num_blocks * block + jnp.arange(N))
  # each block's group: how many groups end at or before its start (searchsorted, written
  # as a [num_blocks, E] count: jnp.searchsorted fails inside a partly manual shard_map)
  block_start = jnp.arange(num_blocks) * block
  block_expert = jnp.sum(padded_ends[None, :] <= block_start[:, None], axis=1)
  num_used = jnp.sum(block_expert < E)
  P = num_blocks * block
  src = (kernels.varying_zeros((P,), jnp.int32, dest) + N).at[dest].set(
      jnp.arange(N, dtype=jnp.int32), mode='drop', unique_indices=True)
  return RowsLayout(dest, src, sizes, jnp.minimum(block_expert, E - 1), num_used,
                    num_blocks, block, impl)


@jax.custom_vjp
def _gather_rows(x_NK, index_P, inverse_N):
  """out[p] = x[index[p]] (0 where index[p] is out of range); `inverse` is its inverse
  (index[inverse[r]] = r, out of range for rows no slot takes). The transpose of this
  injective gather is the gather by the inverse, so both directions are gathers (a scatter,
  autodiff's transpose, measured 2-4x slower on CPU)."""
  del inverse_N
  return x_NK.at[index_P].get(mode='fill', fill_value=0, unique_indices=True)


def _gather_rows_fwd(x_NK, index_P, inverse_N):
  return _gather_rows(x_NK, index_P, inverse_N), (index_P, inverse_N)


def _gather_rows_bwd(res, g_PK):
  index_P, inverse_N = res
  return _gather_rows(g_PK, inverse_N, index_P), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def to_layout(x_NK: jax.Array, layout: RowsLayout) -> jax.Array:
  """[N, K] rows -> [P, K] in the layout (one gather; padding rows 0)."""
  return _gather_rows(x_NK, layout.src, layout.dest)


def from_layout(y_PK: jax.Array, layout: RowsLayout) -> jax.Array:
  """[P, K] in the layout -> [N, K] rows (one gather; rows in no group have out-of-range
  slots, so the fill gives them 0)."""
  return _gather_rows(y_PK, layout.dest, layout.src)


def layout_call(kernel, x_PK, weights, layout):
  if weights[0].shape[0] == 1 and layout.sizes.shape[0] > 1:
    layout = layout.single_group()
  if layout.impl in kernels.RAGGED:
    return kernel(layout.impl, x_PK, weights, layout)
  x_PK, *weights = kernels.common_type(x_PK, *weights)
  return kernel(layout.impl, x_PK, weights, layout)


def layout_matmul(x_PK: jax.Array, w_EKN: jax.Array, layout: RowsLayout) -> jax.Array:
  """Rows of group e in the layout times w[e] (E = 1: one weight for every group); padding
  rows give 0."""
  return layout_call(kernels.matmul_kernel, x_PK, (jnp.asarray(w_EKN),), layout)


def layout_swiglu(x_PD: jax.Array, w_gate_EDF, w_up_EDF, w_down_EFD,
                  layout: RowsLayout) -> jax.Array:
  """SwiGLU of group e's weights on its rows in the layout (E = 1: one FFN for all)."""
  weights = tuple(jnp.asarray(w) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
  return layout_call(kernels.swiglu_kernel, x_PD, weights, layout)


