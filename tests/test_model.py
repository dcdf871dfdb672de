"""The decoder's pieces against plain numpy references, and causality of the whole model."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core import layers

from models import transformer

SPEC = transformer.DecoderSpec(vocab_size=384, num_layers=2, embed_dim=32, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=64)


def _np_rope(x, pos, theta):
  half = x.shape[-1] // 2
  freqs = theta ** (-np.arange(half) / half)
  ang = pos[..., None] * freqs
  sin, cos = np.sin(ang)[:, :, None], np.cos(ang)[:, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def test_attention_matches_numpy_reference():
  attn = layers.Attention(embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                          implementation=None, dtype=jnp.float32,
                          param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(2, 7, 32)).astype(np.float32)
  pos = np.broadcast_to(np.arange(7), (2, 7))
  got = np.asarray(attn(jnp.asarray(x), layers.rope_tables(jnp.asarray(pos), 8, 10_000.0)))

  wq, wk, wv, wo = (np.asarray(w[...], np.float64) for w in (attn.wq, attn.wk, attn.wv, attn.wo))
  q = _np_rope(np.einsum('btd,dhk->bthk', x, wq), pos, 10_000.0)
  k = _np_rope(np.einsum('btd,dgk->btgk', x, wk), pos, 10_000.0)
  v = np.einsum('btd,dgk->btgk', x, wv)
  k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # each kv head serves 2 q heads
  out = np.zeros((2, 7, 4, 8))
  for b in range(2):
    for t in range(7):
      for h in range(4):
        s = (k[b, :t + 1, h] @ q[b, t, h]) / np.sqrt(8)
        p = np.exp(s - s.max())
        out[b, t, h] = (p / p.sum()) @ v[b, :t + 1, h]
  want = np.einsum('bthk,hkd->btd', out, wo)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_rmsnorm_and_swiglu_match_numpy():
  x = np.random.default_rng(1).normal(size=(2, 3, 32)).astype(np.float32)
  norm = layers.RMSNorm(32, rngs=nnx.Rngs(0))
  want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5)
  ffn = layers.SwiGLU(embed_dim=32, mlp_dim=64, dtype=jnp.float32, param_dtype=jnp.float32,
                      rngs=nnx.Rngs(0))
  g, u, d = (np.asarray(w[...], np.float64) for w in (ffn.w_gate, ffn.w_up, ffn.w_down))
  a = x @ g
  want = ((a / (1 + np.exp(-a))) * (x @ u)) @ d
  np.testing.assert_allclose(np.asarray(ffn(jnp.asarray(x))), want, rtol=1e-4, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(2)
  q, k = rng.normal(size=(1, 1, 1, 8)), rng.normal(size=(1, 1, 1, 8))
  score = lambda i, j: float(np.sum(
      np.asarray(layers.apply_rope(jnp.asarray(q), layers.rope_tables(jnp.full((1, 1), i), 8, 100.0))) *
      np.asarray(layers.apply_rope(jnp.asarray(k), layers.rope_tables(jnp.full((1, 1), j), 8, 100.0)))))
  assert abs(score(5, 2) - score(13, 10)) < 1e-4
  assert abs(score(5, 2) - score(5, 3)) > 1e-3


def test_decoder_is_causal():
  model = transformer.Decoder(SPEC, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(3).integers(8, 300, size=(2, 12)).astype(np.int32)
  changed = tokens.copy()
  changed[:, 7:] = np.random.default_rng(4).integers(8, 300, size=(2, 5))
  a, _ = model({'tokens': jnp.asarray(tokens)})
  b, _ = model({'tokens': jnp.asarray(changed)})
  np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
  assert not np.allclose(np.asarray(a[:, 7:]), np.asarray(b[:, 7:]))


def test_bfloat16_compute_keeps_float32_params_and_logits():
  spec = transformer.DecoderSpec(**{**SPEC.__dict__, 'dtype': 'bfloat16'})
  model = transformer.Decoder(spec, rngs=nnx.Rngs(0))
  logits, _ = model({'tokens': jnp.zeros((1, 4), jnp.int32)})
  assert logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
