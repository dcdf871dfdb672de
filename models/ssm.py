"""The selective state-space recurrence of a Mamba block (models/mamba.py), in float32:

    s_t = exp(Δ_t A) ⊙ s_{t-1} + Δ_t B_t x_t        state [B, E, N]
    y_t = s_t C_t                                   [B, E] (the D skip is the block's)

`selective_scan` (training, prefill) has two forms, chosen by `scan` (model.mamba.scan):

- 'associative' (GPU/TPU): chunks of `chunk` steps, an associative scan over
  (a_t, b_t) = (exp(Δ_t A), Δ_t B_t x_t) inside each, the state carried from chunk to chunk
  by a `lax.scan` whose step is rematerialised (one [B, E, N] state kept per chunk).
- 'sequential' (CPU): the token-by-token recurrence with a hand-written backward pass
  (`_blocked_scan`). The forward keeps only the state at the start of each block of
  `min(chunk, SEQ_BLOCK)` steps. The backward walks the blocks in reverse: it recomputes a
  block's states, then runs the adjoint recurrence

      G_t = dy_t C_tᵀ + a_{t+1} ⊙ G_{t+1}          (∂loss/∂s_t; G after the last step = the
                                                    final state's cotangent)

  backwards through it, reducing each step's gradients on the spot:
      P_t = G_t ⊙ a_t ⊙ s_{t-1},   Q_t = Σ_N G_t B_t
      ∂Δ_t = Σ_N P_t A + x_t Q_t,   ∂x_t = Δ_t Q_t,   ∂B_t = Σ_E G_t Δ_t x_t,
      ∂C_t = Σ_E s_t dy_t,          ∂A += Σ_B Δ_t P_t,   ∂s_0 = a_1 ⊙ G_1.
  The state is laid out [B, N, E] inside (E minor, so every step vectorises over E on CPU);
  a block's recomputed states ([SEQ_BLOCK, B, N, E]) stay in cache. docs/mamba.md has the
  measurements behind both choices.

Either way memory is O(chunk · E · N) per chunk at a time, not O(L · E · N).
`recurrent_scan` is the plain token-by-token `lax.scan` differentiated by JAX: the
reference the tests hold both forms to, values and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCANS = ('auto', 'associative', 'sequential')  # model.mamba.scan
UNROLL = 8  # time steps per loop iteration of the sequential scan's output-producing loops
SEQ_BLOCK = 16  # the sequential scan's longest rematerialised block (docs/mamba.md)


def resolve_scan(scan: str) -> str:
  """'auto' -> 'sequential' on CPU, 'associative' on GPU/TPU."""
  if scan != 'auto':
    return scan
  return 'sequential' if jax.default_backend() == 'cpu' else 'associative'


def selective_scan(delta_BLE, A_EN, B_BLN, C_BLN, x_BLE, *, chunk: int, state_BEN=None,
                   scan: str = 'auto'):
  """y [B, L, E] (float32, without the D skip) and the final state [B, E, N]. Padding steps
  (Δ = 0: a = 1, b = 0) leave the state as it is, so L need not divide by the chunk."""
  f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
  delta, A, Bm, Cm, x = map(f32, (delta_BLE, A_EN, B_BLN, C_BLN, x_BLE))
  Bsz, L, E = x.shape
  state = jnp.zeros((Bsz, E, A.shape[1]), jnp.float32) if state_BEN is None else f32(state_BEN)
  sequential = resolve_scan(scan) == 'sequential'
  c = min(chunk, L, SEQ_BLOCK) if sequential else min(chunk, L)
  pad = -L % c
  if pad:
    pad_t = lambda t: jnp.pad(t, ((0, 0), (0, pad)) + ((0, 0),) * (t.ndim - 2))  # noqa: E731
    delta, Bm, Cm, x = map(pad_t, (delta, Bm, Cm, x))
  n = (L + pad) // c
  if sequential:  # time-major blocks [n, c, B, ...], the state [B, N, E]
    blocks = lambda t: jnp.moveaxis(t, 0, 1).reshape(n, c, Bsz, *t.shape[2:])  # noqa: E731
    y, last = _blocked_scan(jnp.swapaxes(state, 1, 2), A.T, blocks(delta), blocks(Bm),
                            blocks(Cm), blocks(x))
    return jnp.moveaxis(y.reshape(n * c, Bsz, E), 0, 1)[:, :L], jnp.swapaxes(last, 1, 2)
  chunks = lambda t: jnp.moveaxis(t.reshape(Bsz, n, c, *t.shape[2:]), 1, 0)  # noqa: E731
  step = jax.checkpoint(lambda s, inp: _chunk_scan(s, inp[0], A, inp[1], inp[2], inp[3]))
  state, y = jax.lax.scan(step, state, (chunks(delta), chunks(Bm), chunks(Cm), chunks(x)))
  return jnp.moveaxis(y, 0, 1).reshape(Bsz, n * c, E)[:, :L], state


def recurrent_scan(delta_BLE, A_EN, B_BLN, C_BLN, x_BLE, state_BEN=None):
  """The same recurrence token by token (`lax.scan` over time, differentiated by JAX): the
  reference."""
  f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
  delta, A, Bm, Cm, x = map(f32, (delta_BLE, A_EN, B_BLN, C_BLN, x_BLE))
  Bsz, _, E = x.shape
  state = (jnp.zeros((Bsz, E, A.shape[1]), jnp.float32) if state_BEN is None
           else f32(state_BEN))

  def step(s, t):
    d, bt, ct, xt = t
    s = jnp.exp(d[..., None] * A) * s + d[..., None] * bt[:, None, :] * xt[..., None]
    return s, jnp.einsum('BEN,BN->BE', s, ct)
  state, y = jax.lax.scan(step, state, tuple(jnp.swapaxes(t, 0, 1) for t in (delta, Bm, Cm, x)))
  return jnp.swapaxes(y, 0, 1), state


# ---------------------------------------------------------------------------
# The associative form: one chunk.


def _combine(left, right):
  a1, b1 = left
  a2, b2 = right
  return a2 * a1, a2 * b1 + b2


def _chunk_scan(state_BEN, delta_BLE, A_EN, B_BLN, C_BLN, x_BLE):
  """One chunk: -> (its last state, y [B, Lc, E] without the D skip)."""
  a = jnp.exp(delta_BLE[..., None] * A_EN)  # [B, Lc, E, N]
  b = delta_BLE[..., None] * B_BLN[:, :, None, :] * x_BLE[..., None]
  a, b = jax.lax.associative_scan(_combine, (a, b), axis=1)
  states = a * state_BEN[:, None] + b
  return states[:, -1], jnp.einsum('BLEN,BLN->BLE', states, C_BLN)


# ---------------------------------------------------------------------------
# The sequential form: time-major blocks d, x [n, c, B, E], b, cm [n, c, B, N]; A [N, E];
# states [B, N, E].


def _decay(A_NE, d_BE):
  return jnp.exp(d_BE[:, None, :] * A_NE)


def _update(a_BNE, s_BNE, d_BE, b_BN, x_BE):
  return a_BNE * s_BNE + (d_BE * x_BE)[:, None, :] * b_BN[:, :, None]


@jax.custom_vjp
def _blocked_scan(s0, A, d, b, cm, x):
  """-> (y [n, c, B, E], the last state)."""
  return _blocked_fwd(s0, A, d, b, cm, x)[0]


def _blocked_fwd(s0, A, d, b, cm, x):
  def step(s, t):
    d_t, b_t, c_t, x_t = t
    s = _update(_decay(A, d_t), s, d_t, b_t, x_t)
    return s, jnp.sum(s * c_t[:, :, None], 1)

  def block(s, inp):
    last, y = jax.lax.scan(step, s, inp, unroll=UNROLL)
    return last, (y, s)
  last, (y, starts) = jax.lax.scan(block, s0, (d, b, cm, x))
  return (y, last), (starts, A, d, b, cm, x)


def _blocked_bwd(res, cotangents):
  starts, A, d, b, cm, x = res
  dy, d_last = cotangents

  def before(s, t):  # the block's states again, each step's state before its update
    d_t, b_t, x_t = t
    return _update(_decay(A, d_t), s, d_t, b_t, x_t), s

  def back(carry, t):  # carry: (a_{t+1} ⊙ G_{t+1}, ∂A per batch row)
    aG, dA = carry
    d_t, b_t, c_t, x_t, dy_t, s_prev = t
    a = _decay(A, d_t)
    s = _update(a, s_prev, d_t, b_t, x_t)
    G = dy_t[:, None, :] * c_t[:, :, None] + aG
    aG = a * G
    P = aG * s_prev
    Q = jnp.sum(G * b_t[:, :, None], 1)
    grads = (jnp.sum(P * A, 1) + x_t * Q,                   # ∂Δ_t
             jnp.sum(G * (d_t * x_t)[:, None, :], 2),       # ∂B_t
             jnp.sum(s * dy_t[:, None, :], 2),              # ∂C_t
             d_t * Q)                                       # ∂x_t
    return (aG, dA + P * d_t[:, None, :]), grads

  def block(carry, inp):
    s0, d_k, b_k, c_k, x_k, dy_k = inp
    # unroll=1: unrolled, this state-stacking loop measured ~2x slower on XLA:CPU.
    s_prev = jax.lax.scan(before, s0, (d_k, b_k, x_k))[1]
    return jax.lax.scan(back, carry, (d_k, b_k, c_k, x_k, dy_k, s_prev), reverse=True,
                        unroll=UNROLL)

  (ds0, dA), (dd, db, dc, dx) = jax.lax.scan(
      block, (d_last, jnp.zeros_like(starts[0])), (starts, d, b, cm, x, dy), reverse=True)
  return ds0, jnp.sum(dA, 0), dd, db, dc, dx


_blocked_scan.defvjp(_blocked_fwd, _blocked_bwd)
