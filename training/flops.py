"""Model FLOPs per token and achieved model FLOP/s (MFU when a peak is known).

Training FLOPs per token = 6 * (ACTIVE matmul parameters, LM head included, embedding
lookup excluded; a MoE layer counts the k experts a token visits, or c under expert choice)
+ 12 * H * K * T per layer for attention scores and values (PaLM's accounting, which counts
the full T x T product even under the causal mask). Rematerialisation is not counted: these
are *model* FLOPs, not hardware FLOPs.

Per layer (`layer_table`, logged at a run's start by training/loop.py): a PR-MoE pyramid's
layers differ in their experts (models/moe_ffn.py `layer_moe`), so in total parameters and
router FLOPs, not in the k experts a token visits.

Mixture-of-depths layers (models/mod.py, the MoMa family's hooks): only k = round(c_d * T)
tokens of each sequence go through the layer, so its matmul parameters count c_d times per
token (the MoD router's D x 1 runs on every token) and its attention runs over k x k instead
of T x T: 12 * H * K * k^2 per sequence, i.e. 12 * H * K * T * (k / T)^2 per token of the
sequence - c_d^2 of a full layer's attention term, not c_d.
"""

from __future__ import annotations

from absl import logging

from models import families, transformer


def layer_flops_per_token(spec: transformer.DecoderSpec, layer: int, seq_len: int) -> float:
  """Training FLOPs per token of one layer: 6 x the matmul parameters a token uses + 12 H K
  x the keys it attends over (the family's `layer_params`, `matmul_params` and
  `attention_keys`)."""
  family = families.get(spec.family)
  active = family.layer_params(spec, layer, True)
  return (6.0 * family.matmul_params(spec, layer, active)
          + 12 * spec.num_heads * spec.head_dim * family.attention_keys(spec, layer, seq_len))


def train_flops_per_token(spec: transformer.DecoderSpec, seq_len: int) -> float:
  """The layers' `layer_flops_per_token` + the LM head's 6 D V."""
  total = 6.0 * spec.embed_dim * spec.vocab_size  # LM head (the embedding lookup is no matmul)
  for i in range(spec.num_layers):
    total += layer_flops_per_token(spec, i, seq_len)
  return total


def layer_table(spec: transformer.DecoderSpec, seq_len: int) -> list[dict]:
  """One row per layer: `layer`, `what` (the family's `layer_summary`, e.g. a PR-MoE
  pyramid's expert count), `params`, `active_params` (per token) and `train_flops` (per
  token)."""
  family = families.get(spec.family)
  return [dict(layer=i, what=family.layer_summary(spec, i) or '-',
               params=int(family.layer_params(spec, i, False)),
               active_params=int(family.layer_params(spec, i, True)),
               train_flops=layer_flops_per_token(spec, i, seq_len))
          for i in range(spec.num_layers)]


def log_layer_table(spec: transformer.DecoderSpec, seq_len: int) -> list[str]:
  """`layer_table` as logging.info lines (the run log at startup); returns them."""
  rows = layer_table(spec, seq_len)
  width = max(len(r['what']) for r in rows)
  lines = [f'{"layer":>5}  {"":{width}}  {"params":>13}  {"active/token":>13}  '
           f'{"train FLOPs/token":>17}']
  lines += [f'{r["layer"]:>5}  {r["what"]:{width}}  {r["params"]:>13,}  '
            f'{r["active_params"]:>13,}  {r["train_flops"]:>17,.0f}' for r in rows]
  lines.append(f'{"model":>5}  {"":{width}}  {transformer.param_count(spec):>13,}  '
               f'{transformer.param_count(spec, active=True):>13,}  '
               f'{train_flops_per_token(spec, seq_len):>17,.0f}  (with embedding, LM head)')
  for line in lines:
    logging.info('%s', line)
  return lines


def train_flops_per_step(spec: transformer.DecoderSpec, seq_len: int, batch_size: int) -> float:
  return train_flops_per_token(spec, seq_len) * seq_len * batch_size
