"""Building blocks of the decoder: parameters with logical axes, RMSNorm, RoPE, attention,
SwiGLU, embeddings.

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


def apply_rope(x_BTHK: jax.Array, sin_cos) -> jax.Array:
  """Rotary position embedding (rotate-half form) on the last axis of [B, T, H, K]."""
  sin, cos = sin_cos
  x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHK.dtype)


class Attention(nnx.Module):
  """Causal multi-head attention (grouped-query when num_kv_heads < num_heads) with RoPE.

  The score/softmax/value product is `jax.nn.dot_product_attention`, so XLA, cuDNN flash
  attention on GPUs (`implementation='cudnn'`) or another backend kernel can be chosen.
  """

  def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int,
               implementation: str | None, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads  # H
    self.num_kv_heads = num_kv_heads  # G, divides H
    self.implementation = implementation  # None/'xla'/'cudnn' for dot_product_attention
    self.dtype = dtype  # compute dtype
    init = fan_in_init(embed_dim)
    self.wq = param(rngs, init, (embed_dim, num_heads, head_dim),
                    ('embed', 'heads', 'head_dim'), param_dtype)
    self.wk = param(rngs, init, (embed_dim, num_kv_heads, head_dim),
                    ('embed', 'kv_heads', 'head_dim'), param_dtype)
    self.wv = param(rngs, init, (embed_dim, num_kv_heads, head_dim),
                    ('embed', 'kv_heads', 'head_dim'), param_dtype)
    self.wo = param(rngs, fan_in_init(num_heads * head_dim), (num_heads, head_dim, embed_dim),
                    ('heads', 'head_dim', 'embed'), param_dtype)

  def __call__(self, x_BTD: jax.Array, rope_sin_cos, mask_BTT: jax.Array | None = None
               ) -> jax.Array:
    """`rope_sin_cos` from `rope_tables` (shared by all layers). `mask_BTT` (bool, query x
    key) further restricts the causal mask; every query must keep at least one key."""
    B, T, D = x_BTD.shape
    x = x_BTD.astype(self.dtype).reshape(B * T, D)  # 2-D matmuls: see SwiGLU
    def project(w):  # [D, heads, K] -> [B, T, heads, K]
      w = w[...].astype(self.dtype)
      return (x @ w.reshape(D, -1)).reshape(B, T, w.shape[1], w.shape[2])
    q = constrain(apply_rope(project(self.wq), rope_sin_cos),
                  ('batch', 'length', 'act_heads', None))
    k = constrain(apply_rope(project(self.wk), rope_sin_cos),
                  ('batch', 'length', 'act_kv_heads', None))
    v = constrain(project(self.wv), ('batch', 'length', 'act_kv_heads', None))
    mask = None if mask_BTT is None else mask_BTT[:, None]
    o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                     implementation=self.implementation)
    o = constrain(o, ('batch', 'length', 'act_heads', None))
    wo = self.wo[...].astype(self.dtype)
    out = o.reshape(B * T, -1) @ wo.reshape(-1, D)
    return constrain(out.reshape(B, T, D), ('batch', 'length', 'act_embed'))


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
