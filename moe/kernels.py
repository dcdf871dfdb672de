"""The grouped-matmul kernels behind moe/grouped.py (its docstring describes them): 'ragged_dot'
(`jax.lax.ragged_dot`), 'tokamax' (`tokamax.ragged_dot`: its Pallas kernels on GPU/TPU, XLA's
ragged_dot elsewhere), 'blocks' (a loop over padded blocks, or chunk GEMMs for the row
calls) and 'batched' (every block in one batched matmul), with their custom VJPs, and the
choice among them ('auto': by backend). Inside `jax.shard_map` the kernels' buffers are typed
as varying over the manual axes their inputs vary over (`varying_zeros`, `common_type`), so they
run per shard as well."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

IMPLS = ('auto', 'ragged_dot', 'tokamax', 'blocks', 'batched')
# Kernels on the exact sorted rows (no padding blocks): one ragged matmul per weight.
RAGGED = ('ragged_dot', 'tokamax')
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


def common_type(*arrays):
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


def varying_zeros(shape, dtype, *like) -> jax.Array:
  """Zeros typed as varying over every manual mesh axis any of `like` varies over, so the
  kernels' loop carries type-check inside `jax.shard_map` (MoT's per-shard projections and
  the ragged expert-parallel path); a plain `jnp.zeros` outside it."""
  z = jnp.zeros(shape, dtype)
  axes = _varying_axes(*like)
  return jax.lax.pcast(z, axes, to='varying') if axes else z


@functools.cache
def _tokamax():
  """tokamax, imported on first use (a few seconds of imports no other kernel needs)."""
  try:
    return importlib.import_module('tokamax')
  except ImportError as e:
    raise ValueError("grouped matmul impl 'tokamax' needs the tokamax package (Python >= 3.12, "
                     f"jax >= 0.11.1; it is in requirements.txt): {e}") from None


def ragged_matmul(kind: str, x_NK, w_EKN, sizes_E):
  """Rows of group e (groups contiguous, sizes_E[e] rows each) times w[e]; rows past the
  groups 0. 'tokamax': tokamax picks its fastest kernel for the device (Pallas Mosaic GPU or
  TPU, Triton) and falls back to XLA's ragged_dot where it has none (CPU)."""
  if kind == 'tokamax':
    return _tokamax().ragged_dot(x_NK, w_EKN, sizes_E)
  return jax.lax.ragged_dot(x_NK, w_EKN, sizes_E)


def swiglu_ragged(x, w_gate, w_up, w_down, sizes, kind: str = 'ragged_dot'):
  gate = ragged_matmul(kind, x, w_gate, sizes)
  up = ragged_matmul(kind, x, w_up, sizes)
  return ragged_matmul(kind, jax.nn.silu(gate) * up, w_down, sizes)


def swiglu_blocks(x_ND, w_gate, w_up, w_down, sizes_E, block: int, batched: bool = False):
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
  xp = varying_zeros((num_blocks * block, D), x_ND.dtype, x_ND).at[dest].set(
      x_ND, mode='drop', unique_indices=True)
  block_start = jnp.arange(num_blocks) * block
  block_expert = jnp.searchsorted(padded_ends, block_start, side='right')
  num_used = jnp.sum(block_expert < E)  # trailing blocks belong to no expert: skipped
  block_expert = jnp.minimum(block_expert, E - 1)

  xb, w_gate, w_up, w_down = common_type(xp.reshape(num_blocks, block, D), w_gate, w_up,
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
  init = (varying_zeros(x_nbD.shape, x_nbD.dtype, *like), varying_zeros((nb, b, F), x_nbD.dtype, *like),
          varying_zeros((nb, b, F), x_nbD.dtype, *like))
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
  init = tuple(varying_zeros(a.shape, a.dtype, *like) for a in (x_nbD, w_gate, w_up, w_down))
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


def resolve(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f'grouped matmul impl {impl!r} is not one of {IMPLS}')
  if impl == 'auto':
    return AUTO.get(jax.default_backend(), 'ragged_dot')
  return impl


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
  y0 = varying_zeros((x_PK.shape[0], w_EKN.shape[2]), jnp.result_type(x_PK, w_EKN), x_PK, w_EKN)
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
                    varying_zeros(x_PK.shape, x_PK.dtype, *like))
  dw = _over_chunks(chunks, lambda e, n, off, dw: dw.at[e].add(
      _rows(x_PK, off, n).T @ _rows(dy_PN, off, n)), varying_zeros(w_EKN.shape, w_EKN.dtype, *like))
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
  init = (varying_zeros(x_PD.shape, x_PD.dtype, *like), varying_zeros((P, F), x_PD.dtype, *like),
          varying_zeros((P, F), x_PD.dtype, *like))
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
  init = tuple(varying_zeros(t.shape, t.dtype, *like) for t in (x, w_gate, w_up, w_down))
  return (*_over_chunks(_chunks(padded_sizes_E, block, x.shape[0]), body, init), None)


_chunks_swiglu.defvjp(_chunks_swiglu_fwd, _chunks_swiglu_bwd)


def tiles(x_PK, layout):
  return x_PK.reshape(layout.num_blocks, layout.block, x_PK.shape[1])


def matmul_kernel(kind, x_PK, weights, layout):
  w = weights[0]
  if w.shape[0] == 1:  # one group holding every row: one dense matmul (padding rows are 0)
    return x_PK @ w[0]
  if kind in RAGGED:
    return ragged_matmul(kind, x_PK, w, layout.sizes)
  if kind == 'batched':
    y = jnp.einsum('nbk,nkm->nbm', tiles(x_PK, layout), _take_blocks(w, layout.block_expert))
    return y.reshape(x_PK.shape[0], -1)
  return _chunks_matmul(x_PK, w, layout.padded_sizes(), layout.block)  # 'blocks'


def swiglu_kernel(kind, x_PD, weights, layout):
  if kind in RAGGED:
    return swiglu_ragged(x_PD, *weights, layout.sizes, kind)
  if kind == 'blocks' and len(layout.sizes) <= CHUNK_MAX_GROUPS:
    return _chunks_swiglu(x_PD, *weights, layout.padded_sizes(), layout.block)
  x = tiles(x_PD, layout)
  if kind == 'batched':
    y = _batched_swiglu(x, *weights, layout.block_expert)
  else:
    y = _blocks_swiglu(x, *weights, layout.block_expert, layout.num_used)
  return y.reshape(x_PD.shape)


