"""What a decoder family provides: the one seam between a family and the shared code.

A family (models/dense.py, moe_ffn.py, moma.py, mot.py) is a `Family` registered by name in
models/families.py; `config.model.family` picks it. The decoder (models/transformer.py),
parameter and FLOP counts (training/flops.py), config checks (training/validate.py), stages
(training/stages.py) and evaluation (training/evaluate.py) reach a family only through these
fields, so adding one touches its own module, its config file and the registry line.

Hooks take the whole `DecoderSpec` (models/transformer.py), whose `family` names the family
and whose family fields (`moe`, `moma` + `mod`, `mot`; a new family keeps its own spec in
`ext`) hold the family's settings, as `spec_fields` built them from the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from core import layers


def attention_and_norm_params(spec) -> int:
  """Q, K, V, O, the attention gate W_g (`attn_gate`: D H or D H K) and the two sub-layer
  norms of one block (every family's attention)."""
  d, h, g, k = spec.embed_dim, spec.num_heads, spec.num_kv_heads, spec.head_dim
  return (d * (h + 2 * g) * k + h * k * d + layers.gate_params(spec.attn_gate, d, h, k)
          + 2 * d)


def _full_attention(spec, layer: int, seq_len: int) -> float:
  del spec, layer
  return float(seq_len)


def _plain_matmuls(spec, layer: int, active_params: float) -> float:
  del layer
  return active_params - 2 * spec.embed_dim  # the norms' scales are not matmuls


def _no_validation(config, sizes) -> None:
  del config, sizes


def _decodes(spec) -> None:
  del spec
  return None


def _identity_stream(decoder, x, modality):
  del decoder, modality
  return x


@dataclasses.dataclass(frozen=True)
class Family:
  """One decoder family. The first three fields are required; the rest default to a plain
  pre-norm transformer layer's behaviour."""
  name: str
  # (config.model, stage) -> {DecoderSpec field: value}, e.g. {'moma': MoMaSpec(...)}
  spec_fields: Callable[[Any, str], dict]
  # (spec, layer index, nnx.Rngs) -> a block: block(x, sin_cos, rng, *, modality, causal)
  #   -> (x, {metric name: value}); metrics ending in 'aux_loss' join the training loss.
  #   For cached decoding (models/generate.py) a block also has `init_cache(batch, max_len)
  #   -> pytree` and `decode(x [B, S, D], sin_cos, *, modality, cache, index [B]) -> (x,
  #   cache)`: the causal function of S new tokens at positions index[b] + s.
  block: Callable[..., Any]
  # (spec, layer index, active) -> the layer's parameters (active: the ones a token uses
  # on average: routed experts counted k or c times)
  layer_params: Callable[[Any, int, bool], float]
  # (config, {mesh axis: size}) -> None; raises ValueError naming the config key at fault
  validate: Callable[[Any, dict], None] = _no_validation
  # (spec, layer, seq_len) -> keys each token's query attends over, PaLM's accounting
  attention_keys: Callable[[Any, int, int], float] = _full_attention
  # (spec, layer, active params of the layer) -> matmul parameters a token uses
  matmul_params: Callable[[Any, int, float], float] = _plain_matmuls
  # (decoder, x, modality) before the first / after the last block (MoT's row layout)
  stream_in: Callable[..., Any] = _identity_stream
  stream_out: Callable[..., Any] = _identity_stream
  # spec -> one name per expert of a layer, for eval's per-modality load report; or None
  expert_names: Callable[[Any], list[str] | None] = lambda spec: None
  # spec -> why this model cannot decode token by token (its routing sees the future and
  # it has no causal routing), or None
  decode_unsupported: Callable[[Any], str | None] = _decodes
  # (spec, layer) -> what the layer is, for the run log's per-layer table (training/flops.py
  # `layer_table`), e.g. 'moe E=32 k=2 F=512'; '' = nothing to add
  layer_summary: Callable[[Any, int], str] = lambda spec, layer: ''
  # What upcycles a dense run into this family (`upcycle_from`): an object with
  # models/upcycle.py's functions (check_compatible, start_warnings, upcycle, source_kind,
  # describe_target); None = models/upcycle.py itself (MoMa and MoE targets)
  upcycler: Any = None
  stages: tuple[str, ...] = ('main',)  # training/stages.py STAGES this family supports
  evaluators: tuple[str, ...] = ('lm', 'generation')  # training/evaluate.py EVALUATORS
