"""Model FLOPs per token and achieved model FLOP/s (MFU when a peak is known).

Training FLOPs per token = 6 * (ACTIVE matmul parameters, LM head included, embedding lookup
excluded; a MoE layer counts the k experts a token visits, or c under expert choice) + 12 * L * H * K * T for attention scores and values (PaLM's accounting, which
counts the full T x T product even under the causal mask). Rematerialisation is not
counted: these are *model* FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

from models import transformer


def train_flops_per_token(spec: transformer.DecoderSpec, seq_len: int) -> float:
  matmul_params = transformer.param_count(spec, embeddings=False, active=True)
  norms = (2 * spec.num_layers + 1) * spec.embed_dim
  attention = 12 * spec.num_layers * spec.num_heads * spec.head_dim * seq_len
  return 6.0 * (matmul_params - norms) + attention


def train_flops_per_step(spec: transformer.DecoderSpec, seq_len: int, batch_size: int) -> float:
  return train_flops_per_token(spec, seq_len) * seq_len * batch_size
