"""Building blocks of the decoder: parameters with logical axes, RMSNorm, RoPE, attention
(optionally gated), SwiGLU, embeddings.

Shape letters (used in docstrings and einsum strings across models/ and moe/):
  B batch, T sequence, D model width, F FFN hidden width, H query heads, G key/value heads,
  K head dim, V vocabulary, E experts, C expert capacity, M modalities, k top-k.

Every parameter is created through `partitioning.param(...)`, which records its logical
axis names in the Variable's `out_sharding` metadata; the rules table maps them onto the mesh.
Parameters are stored in `param_dtype` and cast to `dtype` (the compute dtype) for matmuls;
norms, softmax statistics and the loss stay in float32.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from core.partitioning import constrain, fan_in_init, param

Initializer = nnx.initializers.Initializer

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def dtype_of(name: str):
  if name not in DTYPES:
    raise ValueError(f'unknown dtype {name!r}; choose one of {sorted(DTYPES)}')
  return DTYPES[name]


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) over the last axis, in float32."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.eps = eps  # added to the mean square
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ('norm',), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return (rms_normalize(x, self.eps) * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float):
  """sin and cos of the RoPE angles, [B, T, 1, K/2] each: computed once per forward pass."""
  half = head_dim // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions_BT[..., None].astype(jnp.float32) * freqs  # [B, T, K/2]
  # The barrier keeps the tables materialised: otherwise XLA fuses sin/cos into every
  # consumer and recomputes them per layer, head and pass (~3% of the tiny MoT CPU step).
  return jax.lax.optimization_barrier((jnp.sin(angles)[:, :, None, :],
                                       jnp.cos(angles)[:, :, None, :]))


# ---------------------------------------------------------------------------
# Gated attention (arXiv 2505.06708, docs/gates.md): Y' = SDPA(Q, K, V) * sigmoid(X W_g),
# X the normalised layer input that feeds Q/K/V (each query token's own), before W_O.

ATTN_GATES = ('none', 'headwise', 'elementwise')  # config.model.attn_gate


def gate_shape(gate: str, num_heads: int, head_dim: int
               ) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """The shape and logical axes of W_g after its 'embed' axis: headwise [H] (one scalar per
  head), elementwise [H, K]; () for 'none' (no W_g)."""
  if gate not in ATTN_GATES:
    raise ValueError(f'attention gate {gate!r} is not one of {ATTN_GATES}')
  return {'none': ((), ()), 'headwise': ((num_heads,), ('heads',)),
          'elementwise': ((num_heads, head_dim), ('heads', 'head_dim'))}[gate]


def gate_params(gate: str, embed_dim: int, num_heads: int, head_dim: int) -> int:
  """Entries of W_g: D H (headwise), D H K (elementwise), 0 (none)."""
  shape, _ = gate_shape(gate, num_heads, head_dim)
  n = embed_dim
  for s in shape:
    n *= s
  return n if shape else 0


def apply_gate(o_BTHK: jax.Array, gate_logits: jax.Array) -> jax.Array:
  """o * sigmoid(gate) in float32: `gate_logits` [B, T, H, 1] (headwise) or [B, T, H, K]."""
  g = jax.nn.sigmoid(gate_logits.astype(jnp.float32))
  return (o_BTHK.astype(jnp.float32) * g).astype(o_BTHK.dtype)


def sink_share(q_BTHK: jax.Array, k_BSGK: jax.Array, mask_BTS: jax.Array | None = None,
               *, causal: bool = True) -> jax.Array:
  """Attention probability on key 0, averaged over the heads: float32 [B, T]. The same
  scores as `jax.nn.dot_product_attention` (q k / sqrt(K), causal unless `causal=False`
  (IMP's encoder), `mask_BTS` further restricting the keys; grouped-query heads), computed
  explicitly: eval only (the decoder's `attention_stats`)."""
  B, T, H, K = q_BTHK.shape
  S, G = k_BSGK.shape[1], k_BSGK.shape[2]
  q = q_BTHK.astype(jnp.float32).reshape(B, T, G, H // G, K)
  s = jnp.einsum('BTGRK,BSGK->BGRTS', q, k_BSGK.astype(jnp.float32)) * K ** -0.5
  allowed = (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])[None]  # [1, T, S]
  if not causal:
    allowed = jnp.ones_like(allowed)
  if mask_BTS is not None:
    allowed = allowed & mask_BTS
  s = jnp.where(allowed[:, None, None], s, -jnp.inf)
  p0 = jnp.exp(s[..., 0] - jax.nn.logsumexp(s, axis=-1))  # [B, G, R, T]
  return p0.mean(axis=(1, 2))


def apply_rope(x_BTHK: jax.Array, sin_cos) -> jax.Array:
  """Rotary position embedding (rotate-half form) on the last axis of [B, T, H, K]."""
  sin, cos = sin_cos
  x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHK.dtype)


class Attention(nnx.Module):
  """Causal multi-head attention (grouped-query when num_kv_heads < num_heads) with RoPE,
  optionally gated (`gate`: ATTN_GATES; W_g is created only when gated, so an ungated
  layer's parameters are those of before the gate existed).

  The score/softmax/value product is `jax.nn.dot_product_attention`, so XLA, cuDNN flash
  attention on GPUs (`implementation='cudnn'`) or another backend kernel can be chosen.
  """

  def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int,
               implementation: str | None, dtype, param_dtype, rngs: nnx.Rngs,
               gate: str = 'none'):
    self.num_heads = num_heads  # H
    self.num_kv_heads = num_kv_heads  # G, divides H
    self.implementation = implementation  # None/'xla'/'cudnn' for dot_product_attention
    self.dtype = dtype  # compute dtype
    # eval only (set by Decoder(attention_stats=True)): sow each query's sink share
    self.attention_stats = False
    g_shape, g_axes = gate_shape(gate, num_heads, head_dim)
    init = fan_in_init(embed_dim)
    self.wq = param(rngs, init, (embed_dim, num_heads, head_dim),
                    ('embed', 'heads', 'head_dim'), param_dtype)
    self.wk = param(rngs, init, (embed_dim, num_kv_heads, head_dim),
                    ('embed', 'kv_heads', 'head_dim'), param_dtype)
    self.wv = param(rngs, init, (embed_dim, num_kv_heads, head_dim),
                    ('embed', 'kv_heads', 'head_dim'), param_dtype)
    self.wo = param(rngs, fan_in_init(num_heads * head_dim), (num_heads, head_dim, embed_dim),
                    ('heads', 'head_dim', 'embed'), param_dtype)
    # W_g [D, H] or [D, H, K] (gated only: after W_O, so the other weights draw as before)
    self.wg = (param(rngs, init, (embed_dim,) + g_shape, ('embed',) + g_axes, param_dtype)
               if g_shape else None)

  def _qkv(self, x_BTD, rope_sin_cos):
    """-> q, k, v and the gate's logits ([B, T, H, 1 or K]; None when ungated)."""
    B, T, D = x_BTD.shape
    x = x_BTD.astype(self.dtype).reshape(B * T, D)  # 2-D matmuls: see SwiGLU
    def project(w):  # [D, heads, K] -> [B, T, heads, K]; W_g [D, H] -> [B, T, H, 1]
      w = w[...].astype(self.dtype)
      return (x @ w.reshape(D, -1)).reshape(B, T, w.shape[1], -1)
    q = constrain(apply_rope(project(self.wq), rope_sin_cos),
                  ('batch', 'length', 'act_heads', None))
    k = constrain(apply_rope(project(self.wk), rope_sin_cos),
                  ('batch', 'length', 'act_kv_heads', None))
    v = constrain(project(self.wv), ('batch', 'length', 'act_kv_heads', None))
    g = (None if self.wg is None else
         constrain(project(self.wg), ('batch', 'length', 'act_heads', None)))
    return q, k, v, g

  def _out(self, o_BTHK, gate_BTHK=None):
    B, T = o_BTHK.shape[:2]
    if gate_BTHK is not None:
      o_BTHK = apply_gate(o_BTHK, gate_BTHK)
    o = constrain(o_BTHK, ('batch', 'length', 'act_heads', None))
    wo = self.wo[...].astype(self.dtype)
    out = o.reshape(B * T, -1) @ wo.reshape(-1, wo.shape[-1])
    return constrain(out.reshape(B, T, -1), ('batch', 'length', 'act_embed'))

  def __call__(self, x_BTD: jax.Array, rope_sin_cos, mask_BTT: jax.Array | None = None
               ) -> jax.Array:
    """`rope_sin_cos` from `rope_tables` (shared by all layers). `mask_BTT` (bool, query x
    key) further restricts the causal mask; every query must keep at least one key."""
    q, k, v, g = self._qkv(x_BTD, rope_sin_cos)
    mask = None if mask_BTT is None else mask_BTT[:, None]
    o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                     implementation=self.implementation)
    if self.attention_stats:  # static: the training step never computes this
      self.sow(nnx.Intermediate, 'sink', sink_share(q, k, mask_BTT), capture_noop=True)
    return self._out(o, g)

  def init_cache(self, batch: int, max_len: int) -> dict:
    return init_kv_cache(batch, max_len, self.num_kv_heads, self.wk.shape[-1], self.dtype)

  def decode(self, x_BSD, rope_sin_cos, cache: dict, index_B: jax.Array,
             key_mask_BL: jax.Array | None = None):
    """Attention of S new tokens at positions index[b] + s over the cache and themselves
    (`attend_cached`) -> (out [B, S, D], the cache with their keys and values)."""
    q, k, v, g = self._qkv(x_BSD, rope_sin_cos)
    o, cache = attend_cached(q, k, v, cache, index_B, key_mask_BL, self.implementation)
    return self._out(o, g), cache


# ---------------------------------------------------------------------------
# Key/value caches for decoding (models/generate.py).

CACHE_KV = ('batch', None, 'act_kv_heads', None)  # [B, L, G, K]: batch and heads sharded


def init_kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype) -> dict:
  """Zeros for `max_len` positions of keys and values (RoPE already applied to keys)."""
  zeros = lambda: constrain(jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype),
                            CACHE_KV)
  return {'k': zeros(), 'v': zeros()}


def write_rows(cache_BL: jax.Array, new_BS: jax.Array, index_B: jax.Array) -> jax.Array:
  """cache[b, index[b] + s] = new[b, s]: each row written at its own position."""
  write = lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), i, 0)
  return jax.vmap(write)(cache_BL, new_BS, index_B)


def attend_cached(q_BSHK, k_BSGK, v_BSGK, cache: dict, index_B: jax.Array,
                  key_mask_BL: jax.Array | None = None, implementation: str | None = None):
  """Causal attention of S queries at positions index[b] + s after writing their keys and
  values into the cache there: query i sees cache position j iff j <= i (and, with
  `key_mask` [B, L] bool, iff key_mask[b, j] or j == i: a mixture-of-depths layer's
  skipped tokens are no keys). -> (o [B, S, H, K], new cache). Positions past the query
  are masked, so whatever the cache holds there (zeros, a longer prompt's padding) is
  never read."""
  k = write_rows(cache['k'], k_BSGK, index_B)
  v = write_rows(cache['v'], v_BSGK, index_B)
  k, v = constrain(k, CACHE_KV), constrain(v, CACHE_KV)
  S, L = q_BSHK.shape[1], k.shape[1]
  q_pos = index_B[:, None] + jnp.arange(S)  # [B, S]
  keys = jnp.arange(L)[None, None, :]
  mask = keys <= q_pos[..., None]  # [B, S, L]
  if key_mask_BL is not None:
    mask &= key_mask_BL[:, None, :] | (keys == q_pos[..., None])
  o = jax.nn.dot_product_attention(q_BSHK, k.astype(q_BSHK.dtype), v.astype(q_BSHK.dtype),
                                   mask=mask[:, None], implementation=implementation)
  return o, {**cache, 'k': k, 'v': v}


class SwiGLU(nnx.Module):
  """FFN(x) = (silu(x W_gate) * x W_up) W_down."""

  def __init__(self, *, embed_dim: int, mlp_dim: int, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype  # compute dtype
    self.w_gate = param(rngs, fan_in_init(embed_dim), (embed_dim, mlp_dim),
                        ('embed', 'mlp'), param_dtype)
    self.w_up = param(rngs, fan_in_init(embed_dim), (embed_dim, mlp_dim),
                      ('embed', 'mlp'), param_dtype)
    self.w_down = param(rngs, fan_in_init(mlp_dim), (mlp_dim, embed_dim),
                        ('mlp', 'embed'), param_dtype)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    # Flattened to [B*T, D]: XLA:CPU runs 2-D matmuls (and their weight gradients) ~1.5x
    # faster than the same einsums over [B, T, D]; on GPU/TPU it is the same program.
    B, T, D = x_BTD.shape
    x = x_BTD.astype(self.dtype).reshape(B * T, D)
    gate = x @ self.w_gate[...].astype(self.dtype)
    up = x @ self.w_up[...].astype(self.dtype)
    h = constrain((jax.nn.silu(gate) * up).reshape(B, T, -1), ('batch', 'length', 'act_mlp'))
    out = h.reshape(B * T, -1) @ self.w_down[...].astype(self.dtype)
    return constrain(out.reshape(B, T, D), ('batch', 'length', 'act_embed'))


class Embed(nnx.Module):
  """Token embedding table [V, D]."""

  def __init__(self, *, vocab_size: int, embed_dim: int, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.dtype = dtype  # compute dtype of the looked-up rows
    self.table = param(rngs, nnx.initializers.normal(1.0), (vocab_size, embed_dim),
                       ('vocab', 'embed'), param_dtype)

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    # Gather the (fsdp/tensor-sharded) table before the lookup, as FSDP does for every
    # weight: a row gather from a sharded table would otherwise be replicated by XLA.
    table = constrain(self.table[...], (None, None))
    x = jnp.take(table, tokens_BT, axis=0).astype(self.dtype)
    return constrain(x, ('batch', 'length', 'act_embed'))
