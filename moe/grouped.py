"""Grouped matmuls: each row through its own group's weights, at about dense cost.

  grouped_swiglu(x sorted by expert, group_sizes)   the dropless MoE path (moe/dispatch.py)
  grouped_swiglu_rows / grouped_matmul_rows(x, group id per row)   rows in any order (MoT's
      modality-untied projections): a counting sort on the group id (E is small) gives each
      row's slot in the kernel layout; one gather places the rows, one brings them back
      (no argsort, and no scatter in either direction).

Rows of group j are contiguous in the kernel layout. Four kernels:

  'ragged_dot'  `jax.lax.ragged_dot`: a grouped-matmul kernel on TPU (FLOPs ~ N·D·F).
                XLA:CPU and XLA:GPU lower it to a dense product over all E experts (E x the
                FLOPs), so it is not used there by default.
  'tokamax'     `tokamax.ragged_dot` (tokamax, DeepMind's Pallas kernel library): its Mosaic
                GPU / Mosaic TPU / Triton grouped matmul where the device has one, XLA's
                ragged_dot otherwise (so on CPU it computes what 'ragged_dot' does, at the
                same E x cost). Never picked by 'auto' until measured on a GPU (docs/moe.md).
  'blocks'      MegaBlocks-style: each group is padded to a multiple of `block` rows, the
                padded rows are cut into blocks that each belong to one expert, and a
                loop over the used blocks runs one [block, D] x [D, F] SwiGLU per block
                with that expert's weights (custom VJP: weight gradients accumulate in
                place). FLOPs ~ (N + E·block)·D·F: near dense cost on CPU. The row calls
                (MoT's modalities) run the same layout as chunks instead (`_chunks`): each
                group's blocks in at most log2(num_blocks) + 1 GEMMs, about the dense
                model's speed; always for one matmul, for SwiGLU up to CHUNK_MAX_GROUPS
                groups (the loop above past that).
  'batched'     the same block layout, but every block in one batched matmul, each block
                with its expert's weights gathered ([num_blocks, D, F] per weight; their
                gradients summed back per expert by autodiff). FLOPs ~ (N + E·block)·D·F
                plus that gather: a few large GEMMs instead of a loop of small ones.

'auto' picks 'ragged_dot' on TPU, 'batched' on GPU and 'blocks' on CPU. On GPU (jax 0.11.2,
H100) XLA lowers `ragged_dot` to a dense product over all E experts, as XLA:CPU does: the
dropless layer took 8.3x (float32) / 8.5x (bfloat16) a dense FFN of equal active FLOPs with
it, 2.0x / 2.2x with 'batched' at block 512, and 7.6x / 10.9x with the loop of 'blocks'
(benchmarks/moe_layer.py; docs/moe.md). All four compute the same function
(tests/test_dispatch.py and tests/test_mot.py compare them with per-row references).
This module is the API; the kernels are in moe/kernels.py and the row layout of the `_rows`
calls in moe/rows.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe import kernels, rows
from moe.kernels import AUTO, BLOCK, IMPLS  # noqa: F401  (the kernel choices, by name)


def grouped_swiglu(x_ND: jax.Array, w_gate_EDF: jax.Array, w_up_EDF: jax.Array,
                   w_down_EFD: jax.Array, group_sizes_E: jax.Array, *, impl: str = 'auto',
                   block: int | None = None) -> jax.Array:
  """SwiGLU of expert j on its group of rows; rows past sum(group_sizes) come out 0.
  `block`: rows per block of 'blocks' / 'batched' (None: BLOCK[impl])."""
  impl = kernels.resolve(impl)
  block = block or BLOCK.get(impl, 1)
  sizes = group_sizes_E.astype(jnp.int32)
  if impl in kernels.RAGGED:
    return kernels.swiglu_ragged(x_ND, w_gate_EDF, w_up_EDF, w_down_EFD, sizes, impl)
  return kernels.swiglu_blocks(x_ND, w_gate_EDF, w_up_EDF, w_down_EFD, sizes, block,
                        batched=impl == 'batched')


def _rows_call(kernel, x_NK, weights, group_N, impl, block):
  """Scatter rows into the layout, run `kernel`, gather the rows back (0 for no group)."""
  layout = rows.rows_layout(group_N, weights[0].shape[0], impl=impl, block=block)
  return rows.from_layout(rows.layout_call(kernel, rows.to_layout(x_NK, layout), weights,
                                           layout), layout)


def grouped_matmul_rows(x_NK: jax.Array, w_EKN: jax.Array, group_N: jax.Array, *,
                        impl: str = 'auto', block: int | None = None) -> jax.Array:
  """Row r -> x[r] @ w[group[r]] for rows in any order; group E = no group (gives 0)."""
  return _rows_call(kernels.matmul_kernel, x_NK, (jnp.asarray(w_EKN),), group_N, impl, block)


def grouped_swiglu_rows(x_ND: jax.Array, w_gate_EDF, w_up_EDF, w_down_EFD,
                        group_N: jax.Array, *, impl: str = 'auto',
                        block: int | None = None) -> jax.Array:
  """SwiGLU of expert group[r] on row r, rows in any order; group E = no group (gives 0)."""
  weights = tuple(jnp.asarray(w) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
  return _rows_call(kernels.swiglu_kernel, x_ND, weights, group_N, impl, block)
