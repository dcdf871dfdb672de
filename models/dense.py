"""The dense family: pre-norm transformer blocks with a SwiGLU FFN, the baseline every other
family is compared with (configs/dense.py).

    h = x + Attn(Norm(x)),   y = h + FFN(Norm(h))
"""

from __future__ import annotations

from flax import nnx

from core import layers
from models import family as family_lib


class Block(nnx.Module):
  """Pre-norm transformer block with a SwiGLU FFN, or the given `ffn` module, which returns
  (y, metrics) (the MoE family's MoE layer)."""

  def __init__(self, spec, *, ffn: nnx.Module | None = None, rngs: nnx.Rngs):
    dtype, pdtype = layers.dtype_of(spec.dtype), layers.dtype_of(spec.param_dtype)
    self.attn_norm = layers.RMSNorm(spec.embed_dim, param_dtype=pdtype, rngs=rngs)
    self.attn = layers.Attention(
        embed_dim=spec.embed_dim, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, implementation=spec.attention_impl, dtype=dtype,
        param_dtype=pdtype, rngs=rngs, gate=spec.attn_gate)
    self.ffn_norm = layers.RMSNorm(spec.embed_dim, param_dtype=pdtype, rngs=rngs)
    self.use_moe = ffn is not None  # the FFN routes tokens and reports metrics
    self.ffn = ffn if ffn is not None else layers.SwiGLU(
        embed_dim=spec.embed_dim, mlp_dim=spec.mlp_dim, dtype=dtype, param_dtype=pdtype,
        rngs=rngs)

  def __call__(self, x_BTD, rope_sin_cos, rng=None, *, modality=None, causal=False):
    del modality, causal  # the same weights for every token; no batch-dependent routing
    h = x_BTD + self.attn(self.attn_norm(x_BTD), rope_sin_cos)
    if self.use_moe:
      y, aux = self.ffn(self.ffn_norm(h), rng)
      return h + y, aux
    return h + self.ffn(self.ffn_norm(h)), {}

  def init_cache(self, batch: int, max_len: int) -> dict:
    return self.attn.init_cache(batch, max_len)

  def decode(self, x_BSD, rope_sin_cos, *, modality, cache, index):
    """The block on S new tokens at positions index[b] + s with the layer's K/V cache
    (models/generate.py) -> (y, cache)."""
    del modality
    a, cache = self.attn.decode(self.attn_norm(x_BSD), rope_sin_cos, cache, index)
    h = x_BSD + a
    if self.use_moe:
      return h + self.ffn(self.ffn_norm(h), decoding=True)[0], cache
    return h + self.ffn(self.ffn_norm(h)), cache


def layer_params(spec, layer: int, active: bool) -> int:
  del layer, active
  return family_lib.attention_and_norm_params(spec) + 3 * spec.embed_dim * spec.mlp_dim


FAMILY = family_lib.Family(
    name='dense',
    spec_fields=lambda model_cfg, stage: {},
    block=lambda spec, layer, rngs: Block(spec, rngs=rngs),
    layer_params=layer_params,
)
