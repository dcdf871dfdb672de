"""Grouped matmuls: each row through its own group's weights, at about dense cost.

  grouped_swiglu(x sorted by expert, group_sizes)   the dropless MoE path (moe/dispatch.py)
  grouped_swiglu_rows / grouped_matmul_rows(x, group id per row)   rows in any order (MoT's
      modality-untied projections): a counting sort on the group id (E is small) places
      each row straight into the kernel layout, one gather brings it back; no argsort.

Rows of group j are contiguous in the kernel layout. Three kernels:

  'ragged_dot'  `jax.lax.ragged_dot`: a grouped-matmul kernel on TPU (FLOPs ~ N·D·F).
                XLA:CPU and XLA:GPU lower it to a dense product over all E experts (E x the
                FLOPs), so it is not used there by default.
  'blocks'      MegaBlocks-style: each group is padded to a multiple of `block` rows, the
                padded rows are cut into blocks that each belong to one expert, and a
                loop over the used blocks runs one [block, D] x [D, F] SwiGLU per block
                with that expert's weights (custom VJP: weight gradients accumulate in
                place). FLOPs ~ (N + E·block)·D·F: near dense cost on CPU.
  'batched'     the same block layout, but every block in one batched matmul, each block
                with its expert's weights gathered ([num_blocks, D, F] per weight; their
                gradients summed back per expert by autodiff). FLOPs ~ (N + E·block)·D·F
                plus that gather: a few large GEMMs instead of a loop of small ones.

'auto' picks 'ragged_dot' on TPU, 'batched' on GPU and 'blocks' on CPU. On GPU (jax 0.11.2,
H100) XLA lowers `ragged_dot` to a dense product over all E experts, as XLA:CPU does: the
dropless layer took 8.3x (float32) / 8.5x (bfloat16) a dense FFN of equal active FLOPs with
it, 2.0x / 2.2x with 'batched' at block 512, and 7.6x / 10.9x with the loop of 'blocks'
(benchmarks/moe_layer.py; docs/moe.md). All three compute the same function
(tests/test_dispatch.py and tests/test_mot.py compare them with per-row references).
Inside `jax.shard_map` the kernels' buffers are typed as varying over the manual axes their
inputs vary over (`_zeros`, `_common_type`), so they run per shard as well.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLS = ('auto', 'ragged_dot', 'blocks', 'batched')
AUTO = {'cpu': 'blocks', 'gpu': 'batched', 'cuda': 'batched', 'rocm': 'batched'}  # else ragged_dot
# Default rows per block (block=None), the best of benchmarks/moe_layer.py's sweeps: 2-core
# CPU for 'blocks', H100 for 'batched' (docs/moe.md).
BLOCK = {'blocks': 256, 'batched': 512}


def _varying_axes(*arrays) -> tuple[str, ...]:
  axes = set()
  for a in arrays:
    axes |= set(getattr(getattr(jax.typeof(a), 'manual_axis_type', None), 'varying', ()))
  return tuple(sorted(axes))


def _common_type(*arrays):
  """Inside `jax.shard_map`: every array cast to vary over the union of their varying mesh
  axes, so the custom-VJP kernels see one type (the cast's transpose, a psum, then sums the
  cotangents of replicated inputs: weight gradients over the batch shards, input gradients
  over 'tensor'). Outside shard_map: unchanged."""
  axes = _varying_axes(*arrays)
  if not axes:
    return arrays
  return tuple(jax.lax.pcast(a, tuple(x for x in axes if x not in _varying_axes(a)),
                             to='varying') if set(axes) - set(_varying_axes(a)) else a
               for a in arrays)


def _zeros(shape, dtype, *like) -> jax.Array:
  """Zeros typed as varying over every manual mesh axis any of `like` varies over, so the
  kernels' loop carries type-check inside `jax.shard_map` (MoT's per-shard projections and
  the ragged expert-parallel path); a plain `jnp.zeros` outside it."""
  z = jnp.zeros(shape, dtype)
  axes = _varying_axes(*like)
  return jax.lax.pcast(z, axes, to='varying') if axes else z


def _swiglu_ragged(x, w_gate, w_up, w_down, sizes):
  gate = jax.lax.ragged_dot(x, w_gate, sizes)
  up = jax.lax.ragged_dot(x, w_up, sizes)
  return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, sizes)


def _swiglu_blocks(x_ND, w_gate, w_up, w_down, sizes_E, block: int, batched: bool = False):
  N, D = x_ND.shape
  E = sizes_E.shape[0]
  block = max(1, min(block, N))
  num_blocks = -(-N // block) + E  # enough for N rows plus each group's padding
  padded_sizes = -(-sizes_E // block) * block  # [E]
  ends, padded_ends = jnp.cumsum(sizes_E), jnp.cumsum(padded_sizes)
  starts = ends - sizes_E  # group start in the sorted rows
  padded_starts = padded_ends - padded_sizes  # group start in padded rows
  row = jnp.arange(N)
  group = jnp.searchsorted(ends, row, side='right')  # E for spare rows
  in_group = group < E
  g = jnp.minimum(group, E - 1)
  # spare rows: distinct out-of-range slots, so every index is unique (see _rows_layout)
  dest = jnp.where(in_group, padded_starts[g] + row - starts[g], num_blocks * block + row)
  xp = _zeros((num_blocks * block, D), x_ND.dtype, x_ND).at[dest].set(
      x_ND, mode='drop', unique_indices=True)
  block_start = jnp.arange(num_blocks) * block
  block_expert = jnp.searchsorted(padded_ends, block_start, side='right')
  num_used = jnp.sum(block_expert < E)  # trailing blocks belong to no expert: skipped
  block_expert = jnp.minimum(block_expert, E - 1)

  xb, w_gate, w_up, w_down = _common_type(xp.reshape(num_blocks, block, D), w_gate, w_up,
                                          w_down)
  if batched:
    yp = _batched_swiglu(xb, w_gate, w_up, w_down, block_expert)
  else:
    yp = _blocks_swiglu(xb, w_gate, w_up, w_down, block_expert, num_used)
  yp = yp.reshape(num_blocks * block, D)
  return jnp.where(in_group[:, None],
                   yp.at[dest].get(mode='fill', fill_value=0, unique_indices=True), 0)


def _blocks_forward(x_nbD, w_gate, w_up, w_down, block_expert, num_used):
  """Loop over the used blocks (a prefix): y and the pre-activations a = x W_gate,
  u = x W_up per block; blocks past `num_used` stay 0."""
  nb, b, _ = x_nbD.shape
  F = w_gate.shape[2]

  def one_block(i, carry):
    y, a_all, u_all = carry
    xb, e = x_nbD[i], block_expert[i]
    a, u = xb @ w_gate[e], xb @ w_up[e]
    yb = (jax.nn.silu(a) * u) @ w_down[e]
    return y.at[i].set(yb), a_all.at[i].set(a), u_all.at[i].set(u)

  like = (x_nbD, w_gate, w_up, w_down)
  init = (_zeros(x_nbD.shape, x_nbD.dtype, *like), _zeros((nb, b, F), x_nbD.dtype, *like),
          _zeros((nb, b, F), x_nbD.dtype, *like))
  return jax.lax.fori_loop(0, num_used, one_block, init)


@jax.custom_vjp
def _blocks_swiglu(x_nbD, w_gate, w_up, w_down, block_expert, num_used):
  """Block i < num_used (rows x_nbD[i]) through expert block_expert[i]; the rest give 0."""
  return _blocks_forward(x_nbD, w_gate, w_up, w_down, block_expert, num_used)[0]


def _blocks_fwd(x_nbD, w_gate, w_up, w_down, block_expert, num_used):
  y, a, u = _blocks_forward(x_nbD, w_gate, w_up, w_down, block_expert, num_used)
  return y, (x_nbD, a, u, w_gate, w_up, w_down, block_expert, num_used)


def _blocks_bwd(res, dy_nbD):
  """Per used block, the SwiGLU backward with that expert's weights; weight gradients are
  added in place into one [E, ...] accumulator per weight (autodiff of a scan would instead
  materialise a zero-padded [E, D, F] gradient per block and save every weight slice)."""
  x_nbD, a_nbF, u_nbF, w_gate, w_up, w_down, block_expert, num_used = res

  def one_block(i, carry):
    dx, g_gate, g_up, g_down = carry
    xb, a, u, dyb, e = x_nbD[i], a_nbF[i], u_nbF[i], dy_nbD[i], block_expert[i]
    wg, wu, wd = w_gate[e], w_up[e], w_down[e]
    sig = jax.nn.sigmoid(a)
    silu = a * sig
    dh = dyb @ wd.T
    da = dh * u * (sig * (1 + a * (1 - sig)))
    du = dh * silu
    return (dx.at[i].set(da @ wg.T + du @ wu.T), g_gate.at[e].add(xb.T @ da),
            g_up.at[e].add(xb.T @ du), g_down.at[e].add((silu * u).T @ dyb))

  like = (x_nbD, w_gate, w_up, w_down, dy_nbD)
  init = tuple(_zeros(a.shape, a.dtype, *like) for a in (x_nbD, w_gate, w_up, w_down))
  dx, g_gate, g_up, g_down = jax.lax.fori_loop(0, num_used, one_block, init)
  return dx, g_gate, g_up, g_down, None, None


_blocks_swiglu.defvjp(_blocks_fwd, _blocks_bwd)


def _take_blocks(w_E, block_expert):
  """w[block_expert]: each block's copy of its expert's weights."""
  return _take(w_E.shape[0], w_E, block_expert)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _take(E, w_E, block_expert):
  del E
  return jnp.take(w_E, block_expert, axis=0)


def _take_fwd(E, w_E, block_expert):
  return _take(E, w_E, block_expert), block_expert


def _take_bwd(E, block_expert, g_n):
  """Sum of the blocks' gradients per expert as one float32 matmul with a one-hot [E, nb]
  (exact: one 1 per block) rather than autodiff's scatter-add, which XLA:GPU runs with
  atomics, emulated and slow for bfloat16."""
  onehot = jax.nn.one_hot(block_expert, E, dtype=jnp.float32, axis=0)  # [E, nb]
  g = jnp.einsum('en,n...->e...', onehot, g_n.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  return g.astype(g_n.dtype), None


_take.defvjp(_take_fwd, _take_bwd)


def _batched_swiglu(x_nbD, w_gate, w_up, w_down, block_expert):
  """Every block through its expert in one batched matmul per weight. Blocks that belong to
  no expert hold zero rows (block_expert clipped to E - 1), so they come out 0."""
  wg, wu, wd = (_take_blocks(w, block_expert) for w in (w_gate, w_up, w_down))
  h = jax.nn.silu(jnp.einsum('nbd,ndf->nbf', x_nbD, wg)) * jnp.einsum('nbd,ndf->nbf', x_nbD, wu)
  return jnp.einsum('nbf,nfd->nbd', h, wd)


def _resolve(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f'grouped matmul impl {impl!r} is not one of {IMPLS}')
  if impl == 'auto':
    return AUTO.get(jax.default_backend(), 'ragged_dot')
  return impl


def grouped_swiglu(x_ND: jax.Array, w_gate_EDF: jax.Array, w_up_EDF: jax.Array,
                   w_down_EFD: jax.Array, group_sizes_E: jax.Array, *, impl: str = 'auto',
                   block: int | None = None) -> jax.Array:
  """SwiGLU of expert j on its group of rows; rows past sum(group_sizes) come out 0.
  `block`: rows per block of 'blocks' / 'batched' (None: BLOCK[impl])."""
  impl = _resolve(impl)
  block = block or BLOCK.get(impl, 1)
  sizes = group_sizes_E.astype(jnp.int32)
  if impl == 'ragged_dot':
    return _swiglu_ragged(x_ND, w_gate_EDF, w_up_EDF, w_down_EFD, sizes)
  return _swiglu_blocks(x_ND, w_gate_EDF, w_up_EDF, w_down_EFD, sizes, block,
                        batched=impl == 'batched')


# ---------------------------------------------------------------------------
# One grouped matmul (MoT's modality-untied projections): y = x @ w[group of the row].


@jax.custom_vjp
def _blocks_matmul(x_nbK, w_EKN, block_expert, num_used):
  """Block i < num_used: x_nbK[i] @ w[block_expert[i]]; the other blocks give 0."""
  nb, b, _ = x_nbK.shape

  def one(i, y):
    return y.at[i].set(x_nbK[i] @ w_EKN[block_expert[i]])

  y0 = _zeros((nb, b, w_EKN.shape[2]), jnp.result_type(x_nbK, w_EKN), x_nbK, w_EKN)
  return jax.lax.fori_loop(0, num_used, one, y0)


def _blocks_matmul_fwd(x_nbK, w_EKN, block_expert, num_used):
  return _blocks_matmul(x_nbK, w_EKN, block_expert, num_used), (x_nbK, w_EKN, block_expert,
                                                                  num_used)


def _blocks_matmul_bwd(res, dy_nbN):
  x_nbK, w_EKN, block_expert, num_used = res

  def one(i, carry):
    dx, dw = carry
    e = block_expert[i]
    return (dx.at[i].set(dy_nbN[i] @ w_EKN[e].T), dw.at[e].add(x_nbK[i].T @ dy_nbN[i]))

  like = (x_nbK, w_EKN, dy_nbN)
  dx, dw = jax.lax.fori_loop(0, num_used, one, (_zeros(x_nbK.shape, x_nbK.dtype, *like),
                                                _zeros(w_EKN.shape, w_EKN.dtype, *like)))
  return dx, dw, None, None


_blocks_matmul.defvjp(_blocks_matmul_fwd, _blocks_matmul_bwd)


# ---------------------------------------------------------------------------
# Unsorted rows with a group id each (MoT): a counting sort straight into the kernel layout.


class RowsLayout(NamedTuple):
  """Where each of N rows sits in a kernel layout of P = num_blocks * block rows (groups
  contiguous, each padded to a multiple of `block`; block 1: the exact sorted order).
  Built once, it serves every grouped call over the same rows (MoT: all projections of a
  block), and values can stay in the layout between calls (`to_layout` / `from_layout`)."""
  dest: jax.Array  # [N] row -> slot (rows in no group: distinct out-of-range slots)
  in_group: jax.Array  # [N] bool
  sizes: jax.Array  # [E] rows per group
  block_expert: jax.Array  # [num_blocks] each block's group (clipped to E - 1)
  num_used: jax.Array  # blocks holding rows: a prefix
  num_blocks: int
  block: int
  impl: str  # resolved kernel: 'ragged_dot' | 'blocks' | 'batched'

  def single_group(self) -> 'RowsLayout':
    """The same slots as one group (a tied weight over every row of the layout)."""
    return self._replace(sizes=jnp.sum(self.sizes, keepdims=True),
                         block_expert=jnp.zeros_like(self.block_expert))


def rows_layout(group_N: jax.Array, num_groups: int, *, impl: str = 'auto',
                block: int | None = None) -> RowsLayout:
  """Destination of each row in the kernel layout, from its group id (num_groups = none):
  rank within the group by a cumulative count (no argsort; the number of groups E is
  small), groups padded to multiples of `block`; ceil(N / block) + E - 1 blocks always
  suffice (sum_e ceil(n_e / block) <= ceil(N / block) + E - 1)."""
  impl = _resolve(impl)
  group_N = group_N.astype(jnp.int32)
  N, E = group_N.shape[0], num_groups
  block = 1 if impl == 'ragged_dot' else max(1, min(block or BLOCK[impl], N))
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
  block_expert = jnp.searchsorted(padded_ends, jnp.arange(num_blocks) * block, side='right')
  num_used = jnp.sum(block_expert < E)
  return RowsLayout(dest, in_group, sizes, jnp.minimum(block_expert, E - 1), num_used,
                    num_blocks, block, impl)


def to_layout(x_NK: jax.Array, layout: RowsLayout) -> jax.Array:
  """[N, K] rows -> [P, K] in the layout (one scatter; padding rows 0)."""
  P = layout.num_blocks * layout.block
  return _zeros((P,) + x_NK.shape[1:], x_NK.dtype, x_NK).at[layout.dest].set(
      x_NK, mode='drop', unique_indices=True)


def from_layout(y_PK: jax.Array, layout: RowsLayout) -> jax.Array:
  """[P, K] in the layout -> [N, K] rows (one gather; rows in no group have out-of-range
  slots, so the fill gives them 0)."""
  return y_PK.at[layout.dest].get(mode='fill', fill_value=0, unique_indices=True)


def _layout_call(kernel, x_PK, weights, layout):
  if weights[0].shape[0] == 1 and layout.sizes.shape[0] > 1:
    layout = layout.single_group()
  if layout.impl == 'ragged_dot':
    return kernel('ragged_dot', x_PK, weights, layout.sizes)
  nb, b = layout.num_blocks, layout.block
  xb, *weights = _common_type(x_PK.reshape(nb, b, x_PK.shape[1]), *weights)
  yp = kernel(layout.impl, xb, weights, (layout.block_expert, layout.num_used))
  return yp.reshape(nb * b, -1)


def layout_matmul(x_PK: jax.Array, w_EKN: jax.Array, layout: RowsLayout) -> jax.Array:
  """Rows of group e in the layout times w[e] (E = 1: one weight for every group); padding
  rows give 0."""
  return _layout_call(_matmul_kernel, x_PK, (jnp.asarray(w_EKN),), layout)


def layout_swiglu(x_PD: jax.Array, w_gate_EDF, w_up_EDF, w_down_EFD,
                  layout: RowsLayout) -> jax.Array:
  """SwiGLU of group e's weights on its rows in the layout (E = 1: one FFN for all)."""
  weights = tuple(jnp.asarray(w) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
  return _layout_call(_swiglu_kernel, x_PD, weights, layout)


def _rows_call(kernel, x_NK, weights, group_N, impl, block):
  """Scatter rows into the layout, run `kernel`, gather the rows back (0 for no group)."""
  layout = rows_layout(group_N, weights[0].shape[0], impl=impl, block=block)
  return from_layout(_layout_call(kernel, to_layout(x_NK, layout), weights, layout), layout)


def _matmul_kernel(kind, x, weights, extra):
  if kind == 'ragged_dot':
    return jax.lax.ragged_dot(x, weights[0], extra)
  if kind == 'batched':
    return jnp.einsum('nbk,nkm->nbm', x, _take_blocks(weights[0], extra[0]))
  return _blocks_matmul(x, weights[0], *extra)


def _swiglu_kernel(kind, x, weights, extra):
  if kind == 'ragged_dot':
    return _swiglu_ragged(x, *weights, extra)
  if kind == 'batched':
    return _batched_swiglu(x, *weights, extra[0])
  return _blocks_swiglu(x, *weights, *extra)


def grouped_matmul_rows(x_NK: jax.Array, w_EKN: jax.Array, group_N: jax.Array, *,
                        impl: str = 'auto', block: int | None = None) -> jax.Array:
  """Row r -> x[r] @ w[group[r]] for rows in any order; group E = no group (gives 0)."""
  return _rows_call(_matmul_kernel, x_NK, (jnp.asarray(w_EKN),), group_N, impl, block)


def grouped_swiglu_rows(x_ND: jax.Array, w_gate_EDF, w_up_EDF, w_down_EFD,
                        group_N: jax.Array, *, impl: str = 'auto',
                        block: int | None = None) -> jax.Array:
  """SwiGLU of expert group[r] on row r, rows in any order; group E = no group (gives 0)."""
  weights = tuple(jnp.asarray(w) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
  return _rows_call(_swiglu_kernel, x_ND, weights, group_N, impl, block)
