"""Model FLOPs per token and achieved model FLOP/s (MFU when a peak is known).

Training FLOPs per token = 6 * (ACTIVE matmul parameters, LM head included, embedding
lookup excluded; a MoE layer counts the k experts a token visits, or c under expert choice)
+ 12 * H * K * T per layer for attention scores and values (PaLM's accounting, which counts
the full T x T product even under the causal mask). Rematerialisation is not counted: these
are *model* FLOPs, not hardware FLOPs.

Mixture-of-depths layers (models/mod.py, the MoMa family's hooks): only k = round(c_d * T)
tokens of each sequence go through the layer, so its matmul parameters count c_d times per
token (the MoD router's D x 1 runs on every token) and its attention runs over k x k instead
of T x T: 12 * H * K * k^2 per sequence, i.e. 12 * H * K * T * (k / T)^2 per token of the
sequence - c_d^2 of a full layer's attention term, not c_d.
"""

from __future__ import annotations

from models import families, transformer


def train_flops_per_token(spec: transformer.DecoderSpec, seq_len: int) -> float:
  """6 x the matmul parameters a token uses + 12 H K x the keys it attends over, per layer
  (the family's `layer_params`, `matmul_params` and `attention_keys`), + the LM head."""
  family, d = families.get(spec.family), spec.embed_dim
  total = 6.0 * d * spec.vocab_size  # LM head (the embedding lookup is no matmul)
  for i in range(spec.num_layers):
    active = family.layer_params(spec, i, True)
    total += 6.0 * family.matmul_params(spec, i, active)
    total += 12 * spec.num_heads * spec.head_dim * family.attention_keys(spec, i, seq_len)
  return total


def train_flops_per_step(spec: transformer.DecoderSpec, seq_len: int, batch_size: int) -> float:
  return train_flops_per_token(spec, seq_len) * seq_len * batch_size
