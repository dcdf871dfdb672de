"""training/flops.py against FLOPs written out by hand from the layer shapes.

Mixture-of-depths: a MoD layer runs on k = round(c_d T) tokens per sequence, so per token of
the sequence its matmuls cost c_d of a full layer's and its attention (k x k instead of
T x T) c_d^2 of it."""

import pytest

from configs import dense, moma
from training import flops, state as state_lib


def _by_hand(spec, seq_len, *, mod_capacity=None):
  """6 x matmul params per token + 12 H K x (keys attended) per layer, summed by hand."""
  d, h, kd, f, v, L = (spec.embed_dim, spec.num_heads, spec.head_dim, spec.mlp_dim,
                       spec.vocab_size, spec.num_layers)
  attn = 4 * d * d  # Q, K, V, O with G = H and H K = D
  ffn = 3 * d * f  # SwiGLU; MoMa expert choice with c_e = 1/E_m: one expert per token
  router = d * spec.moma.num_experts if spec.moma is not None else 0
  total = 6 * d * v  # LM head
  for i in range(L):
    layer = 6 * (attn + ffn + router)
    attention = 12 * h * kd * seq_len
    if mod_capacity is not None and i % 2 == 0:  # MoD layers 0, 2, ...
      k = round(mod_capacity * seq_len)
      layer = layer * k / seq_len + 6 * d  # + the MoD router on every token
      attention = 12 * h * kd * k * k / seq_len
    total += layer + attention
  return total


@pytest.mark.parametrize('seq_len', [128, 192])
def test_dense_flops_by_hand(seq_len):
  spec = state_lib.model_spec(dense.get_config('tiny'))
  assert flops.train_flops_per_token(spec, seq_len) == pytest.approx(
      _by_hand(spec, seq_len), rel=1e-12)


@pytest.mark.parametrize('capacity,seq_len', [(0.25, 128), (0.25, 192), (0.5, 128)])
def test_mod_attention_scales_with_capacity_squared(capacity, seq_len):
  config = moma.get_config('tiny,groups=4t4i,norm=pre,mod=1')
  config.model.moma.mod.capacity = capacity
  spec = state_lib.model_spec(config)
  assert flops.train_flops_per_token(spec, seq_len) == pytest.approx(
      _by_hand(spec, seq_len, mod_capacity=capacity), rel=1e-12)
  # The same model without MoD: the difference is exactly the skipped matmuls and
  # (1 - c_d^2) of the MoD layers' attention, less the MoD routers.
  no_mod = moma.get_config('tiny,groups=4t4i,norm=pre')
  full = flops.train_flops_per_token(state_lib.model_spec(no_mod), seq_len)
  d = spec.embed_dim
  per_layer = 6 * (4 * d * d + 3 * d * spec.mlp_dim + d * spec.moma.num_experts)
  attention = 12 * spec.num_heads * spec.head_dim * seq_len
  mod_layers = 2
  saved = mod_layers * ((1 - capacity) * per_layer + (1 - capacity ** 2) * attention
                        - 6 * d)
  assert full - flops.train_flops_per_token(spec, seq_len) == pytest.approx(saved,
                                                                             rel=1e-12)
