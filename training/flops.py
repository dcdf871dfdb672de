"""Model FLOPs per token and achieved model FLOP/s (MFU when a peak is known).

Training FLOPs per token = 6 * (ACTIVE matmul parameters, LM head included, embedding
lookup excluded; a MoE layer counts the k experts a token visits, or c under expert choice)
+ 12 * H * K * T per layer for attention scores and values (PaLM's accounting, which counts
the full T x T product even under the causal mask). Rematerialisation is not counted: these
are *model* FLOPs, not hardware FLOPs.

Mixture-of-depths layers (models/mod.py): only k = round(c_d * T) tokens of each sequence go
through the layer, so its matmul parameters count c_d times per token (`param_count(active=
True)`; the MoD router's D x 1 runs on every token) and its attention runs over k x k instead
of T x T: 12 * H * K * k^2 per sequence, i.e. 12 * H * K * T * (k / T)^2 per token of the
sequence - c_d^2 of a full layer's attention term, not c_d.
"""

from __future__ import annotations

from models import transformer


def attention_tokens(spec: transformer.DecoderSpec, layer: int, seq_len: int) -> float:
  """Keys each token of the sequence attends over on average, in PaLM's accounting: T for a
  full layer; k^2 / T for a MoD layer (k selected tokens attend over each other)."""
  if spec.mod is not None and spec.mod.is_mod_layer(layer):
    k = spec.mod.num_selected(seq_len)
    return k * k / seq_len
  return float(seq_len)


def train_flops_per_token(spec: transformer.DecoderSpec, seq_len: int) -> float:
  matmul_params = transformer.param_count(spec, embeddings=False, active=True)
  # Norm scales are in param_count but are not matmuls; a MoD layer's count c_d times.
  mod_share = lambda i: (spec.mod.capacity if spec.mod is not None
                         and spec.mod.is_mod_layer(i) else 1.0)
  norms = spec.embed_dim * (1 + sum(2 * mod_share(i) for i in range(spec.num_layers)))
  attention = 12 * spec.num_heads * spec.head_dim * sum(
      attention_tokens(spec, i, seq_len) for i in range(spec.num_layers))
  return 6.0 * (matmul_params - norms) + attention


def train_flops_per_step(spec: transformer.DecoderSpec, seq_len: int, batch_size: int) -> float:
  return train_flops_per_token(spec, seq_len) * seq_len * batch_size
