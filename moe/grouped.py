"""Grouped matmuls: each row through its own group's weights, at about dense cost.

  grouped_swiglu(x sorted by expert, group_sizes)   the dropless MoE path (moe/dispatch.py)
  grouped_swiglu_rows / grouped_matmul_rows(x, group id per row)   rows in any order (MoT's
      modality-untied projections): a counting sort on the group id (E is small) gives each
      row's slot in the kernel layout; one gather places the rows, one brings them back
      (no argsort, and no scatter in either direction).

Rows of group j are contiguous in the kernel layout. Three kernels:

  'ragged_dot'  `jax.lax.ragged_dot`: a grouped-matmul kernel on TPU (FLOPs ~ N·D·F).
                XLA:CPU and XLA:GPU lower it to a dense product over all E experts (E x the
                FLOPs), so it is not used there by default.
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
# Up to this many groups, 'blocks' SwiGLU layout calls run as chunks (see _chunks): MoT's
# modalities. More groups (MoE experts) would mean E x log2(P / block) conditionals.
CHUNK_MAX_GROUPS = 8


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


def _swiglu_grads(x, a, u, dy, w_gate, w_up, w_down):
  """SwiGLU backward of rows x with pre-activations a = x W_gate, u = x W_up: the
  gradients of x, W_gate, W_up and W_down."""
  sig = jax.nn.sigmoid(a)
  silu = a * sig
  dh = dy @ w_down.T
  da = dh * u * (sig * (1 + a * (1 - sig)))
  du = dh * silu
  return da @ w_gate.T + du @ w_up.T, x.T @ da, x.T @ du, (silu * u).T @ dy


def _blocks_bwd(res, dy_nbD):
  """Per used block, the SwiGLU backward with that expert's weights; weight gradients are
  added in place into one [E, ...] accumulator per weight (autodiff of a scan would instead
  materialise a zero-padded [E, D, F] gradient per block and save every weight slice)."""
  x_nbD, a_nbF, u_nbF, w_gate, w_up, w_down, block_expert, num_used = res

  def one_block(i, carry):
    dx, g_gate, g_up, g_down = carry
    e = block_expert[i]
    dxb, gg, gu, gd = _swiglu_grads(x_nbD[i], a_nbF[i], u_nbF[i], dy_nbD[i], w_gate[e],
                                    w_up[e], w_down[e])
    return (dx.at[i].set(dxb), g_gate.at[e].add(gg), g_up.at[e].add(gu),
            g_down.at[e].add(gd))

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
# Chunks ('blocks' for the row calls: every matmul, SwiGLU up to CHUNK_MAX_GROUPS groups):
# group e's padded rows, a multiple of `block`, are cut by the binary digits of their block count into at most
# log2(P / block) + 1 contiguous chunks, each ONE matmul under a `lax.cond` (static sizes,
# dynamic offsets). Dense-sized GEMMs instead of a loop of block-sized ones, and no dynamic
# slicing of the weights.


def _chunks(padded_sizes_E, block: int, P: int):
  """(group, rows, offset, taken) of every possible chunk, largest first per group."""
  starts = jnp.cumsum(padded_sizes_E) - padded_sizes_E
  out = []
  for e in range(padded_sizes_E.shape[0]):
    off = starts[e]
    for k in reversed(range((P // block).bit_length())):
      rows = block << k  # <= P
      taken = (padded_sizes_E[e] // rows) % 2 == 1
      out.append((e, rows, off, taken))
      off = off + jnp.where(taken, rows, 0)
  return out


def _over_chunks(chunks, body, carry):
  """carry <- body(group, rows, offset, carry) for each taken chunk."""
  for e, rows, off, taken in chunks:
    carry = jax.lax.cond(taken, functools.partial(body, e, rows, off), lambda c: c, carry)
  return carry


def _rows(a, off, rows):
  return jax.lax.dynamic_slice_in_dim(a, off, rows)


def _put(buf, value, off):
  return jax.lax.dynamic_update_slice_in_dim(buf, value, off, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunks_matmul(x_PK, w_EKN, padded_sizes_E, block):
  """Rows of group e (padded_sizes_E[e] rows, groups in order) times w[e]; other rows 0."""
  y0 = _zeros((x_PK.shape[0], w_EKN.shape[2]), jnp.result_type(x_PK, w_EKN), x_PK, w_EKN)
  return _over_chunks(_chunks(padded_sizes_E, block, x_PK.shape[0]),
                      lambda e, n, off, y: _put(y, _rows(x_PK, off, n) @ w_EKN[e], off), y0)


def _chunks_matmul_fwd(x_PK, w_EKN, padded_sizes_E, block):
  return _chunks_matmul(x_PK, w_EKN, padded_sizes_E, block), (x_PK, w_EKN, padded_sizes_E)


def _chunks_matmul_bwd(block, res, dy_PN):
  """dx and dw as two independent chains of chunks, which XLA:CPU can run side by side."""
  x_PK, w_EKN, padded_sizes_E = res
  like = (x_PK, w_EKN, dy_PN)
  chunks = _chunks(padded_sizes_E, block, x_PK.shape[0])
  dx = _over_chunks(chunks, lambda e, n, off, dx: _put(dx, _rows(dy_PN, off, n) @ w_EKN[e].T,
                                                       off),
                    _zeros(x_PK.shape, x_PK.dtype, *like))
  dw = _over_chunks(chunks, lambda e, n, off, dw: dw.at[e].add(
      _rows(x_PK, off, n).T @ _rows(dy_PN, off, n)), _zeros(w_EKN.shape, w_EKN.dtype, *like))
  return dx, dw, None


_chunks_matmul.defvjp(_chunks_matmul_fwd, _chunks_matmul_bwd)


def _chunks_swiglu_forward(x_PD, w_gate, w_up, w_down, padded_sizes_E, block):
  """SwiGLU by chunks: y and the pre-activations a = x W_gate, u = x W_up ([P, F])."""
  P, F = x_PD.shape[0], w_gate.shape[2]

  def body(e, n, off, carry):
    y, a_all, u_all = carry
    xc = _rows(x_PD, off, n)
    a, u = xc @ w_gate[e], xc @ w_up[e]
    return (_put(y, (jax.nn.silu(a) * u) @ w_down[e], off), _put(a_all, a, off),
            _put(u_all, u, off))

  like = (x_PD, w_gate, w_up, w_down)
  init = (_zeros(x_PD.shape, x_PD.dtype, *like), _zeros((P, F), x_PD.dtype, *like),
          _zeros((P, F), x_PD.dtype, *like))
  return _over_chunks(_chunks(padded_sizes_E, block, P), body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunks_swiglu(x_PD, w_gate, w_up, w_down, padded_sizes_E, block):
  """SwiGLU of group e on its padded rows (groups in order); other rows 0."""
  return _chunks_swiglu_forward(x_PD, w_gate, w_up, w_down, padded_sizes_E, block)[0]


def _chunks_swiglu_fwd(x_PD, w_gate, w_up, w_down, padded_sizes_E, block):
  y, a, u = _chunks_swiglu_forward(x_PD, w_gate, w_up, w_down, padded_sizes_E, block)
  return y, (x_PD, a, u, w_gate, w_up, w_down, padded_sizes_E)


def _chunks_swiglu_bwd(block, res, dy_PD):
  """The SwiGLU backward per chunk with its group's weights."""
  x, a_all, u_all, w_gate, w_up, w_down, padded_sizes_E = res

  def body(e, n, off, carry):
    dx, g_gate, g_up, g_down = carry
    dxc, gg, gu, gd = _swiglu_grads(*(_rows(t, off, n) for t in (x, a_all, u_all, dy_PD)),
                                    w_gate[e], w_up[e], w_down[e])
    return (_put(dx, dxc, off), g_gate.at[e].add(gg), g_up.at[e].add(gu),
            g_down.at[e].add(gd))

  like = (x, w_gate, w_up, w_down, dy_PD)
  init = tuple(_zeros(t.shape, t.dtype, *like) for t in (x, w_gate, w_up, w_down))
  return (*_over_chunks(_chunks(padded_sizes_E, block, x.shape[0]), body, init), None)


_chunks_swiglu.defvjp(_chunks_swiglu_fwd, _chunks_swiglu_bwd)


# ---------------------------------------------------------------------------
# Unsorted rows with a group id each (MoT): a counting sort straight into the kernel layout.


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
  impl: str  # resolved kernel: 'ragged_dot' | 'blocks' | 'batched'

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
  # each block's group: how many groups end at or before its start (searchsorted, written
  # as a [num_blocks, E] count: jnp.searchsorted fails inside a partly manual shard_map)
  block_start = jnp.arange(num_blocks) * block
  block_expert = jnp.sum(padded_ends[None, :] <= block_start[:, None], axis=1)
  num_used = jnp.sum(block_expert < E)
  P = num_blocks * block
  src = (_zeros((P,), jnp.int32, dest) + N).at[dest].set(
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


def _layout_call(kernel, x_PK, weights, layout):
  if weights[0].shape[0] == 1 and layout.sizes.shape[0] > 1:
    layout = layout.single_group()
  if layout.impl == 'ragged_dot':
    return kernel('ragged_dot', x_PK, weights, layout)
  x_PK, *weights = _common_type(x_PK, *weights)
  return kernel(layout.impl, x_PK, weights, layout)


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


def _tiles(x_PK, layout):
  return x_PK.reshape(layout.num_blocks, layout.block, x_PK.shape[1])


def _matmul_kernel(kind, x_PK, weights, layout):
  w = weights[0]
  if w.shape[0] == 1:  # one group holding every row: one dense matmul (padding rows are 0)
    return x_PK @ w[0]
  if kind == 'ragged_dot':
    return jax.lax.ragged_dot(x_PK, w, layout.sizes)
  if kind == 'batched':
    y = jnp.einsum('nbk,nkm->nbm', _tiles(x_PK, layout), _take_blocks(w, layout.block_expert))
    return y.reshape(x_PK.shape[0], -1)
  return _chunks_matmul(x_PK, w, layout.padded_sizes(), layout.block)  # 'blocks'


def _swiglu_kernel(kind, x_PD, weights, layout):
  if kind == 'ragged_dot':
    return _swiglu_ragged(x_PD, *weights, layout.sizes)
  if kind == 'blocks' and len(layout.sizes) <= CHUNK_MAX_GROUPS:
    return _chunks_swiglu(x_PD, *weights, layout.padded_sizes(), layout.block)
  x = _tiles(x_PD, layout)
  if kind == 'batched':
    y = _batched_swiglu(x, *weights, layout.block_expert)
  else:
    y = _blocks_swiglu(x, *weights, layout.block_expert, layout.num_used)
  return y.reshape(x_PD.shape)


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
