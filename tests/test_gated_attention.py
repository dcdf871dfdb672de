"""Gated attention (model.attn_gate, docs/gates.md): Y' = SDPA(Q, K, V) * sigmoid(X W_g)
before W_O. 'none' is today's attention bit for bit; W_g = 0 halves the output; headwise is
elementwise with repeated columns; sharded == unsharded; MoT's gate is per modality;
cached decoding applies it; parameter counts include it; and eval's attention statistics
(sink share, peak activation) against hand-built cases."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dense, imp as imp_config, moma, mot as mot_config
from core import layers, partitioning
from data import tokenizer
from models import families, transformer
from projects.imp import model as imp
from tests.helpers import loss_and_grads, random_batch, tiny_config
from tests.test_decode import cached_logits, full_logits
from training import evaluate, state as state_lib, step as step_lib
from training.validate import validate

D, H, G, K = 32, 4, 2, 8


def attention(gate='none', seed=0):
  return layers.Attention(embed_dim=D, num_heads=H, num_kv_heads=G, head_dim=K,
                          implementation=None, dtype=jnp.float32, param_dtype=jnp.float32,
                          rngs=nnx.Rngs(seed), gate=gate)


def inputs(B=2, T=7):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, D)), jnp.float32)
  sin_cos = layers.rope_tables(jnp.broadcast_to(jnp.arange(T), (B, T)), K, 10_000.0)
  return x, sin_cos


def copy_qkvo(src, dst):
  for name in ('wq', 'wk', 'wv', 'wo'):
    getattr(dst, name)[...] = getattr(src, name)[...]


@jax.jit
def todays_attention(wq, wk, wv, wo, x, sin_cos):
  """core/layers.Attention.__call__ as it was before the gate, step by step."""
  B, T, _ = x.shape
  x2 = x.reshape(B * T, D)
  project = lambda w: (x2 @ w.reshape(D, -1)).reshape(B, T, w.shape[1], w.shape[2])
  q = layers.apply_rope(project(wq), sin_cos)
  k = layers.apply_rope(project(wk), sin_cos)
  o = jax.nn.dot_product_attention(q, k, project(wv), is_causal=True)
  return (o.reshape(B * T, -1) @ wo.reshape(-1, wo.shape[-1])).reshape(B, T, -1)


def run(module, x, sin_cos):
  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, x, sc: nnx.merge(graphdef, s)(x, sc))(state, x, sin_cos)


def test_no_gate_is_todays_attention_bit_for_bit():
  attn = attention('none')
  assert attn.wg is None
  assert set(nnx.to_pure_dict(nnx.state(attn, nnx.Param))) == {'wq', 'wk', 'wv', 'wo'}
  x, sc = inputs()
  want = todays_attention(*(getattr(attn, w)[...] for w in ('wq', 'wk', 'wv', 'wo')), x, sc)
  np.testing.assert_array_equal(np.asarray(run(attn, x, sc)), np.asarray(want))


@pytest.mark.parametrize('gate, shape', [('headwise', (D, H)), ('elementwise', (D, H, K))])
def test_a_zero_gate_halves_the_attention_output(gate, shape):
  gated, plain = attention(gate), attention('none', seed=1)
  assert gated.wg.shape == shape
  assert tuple(gated.wg.out_sharding) == ('embed', 'heads', 'head_dim')[:len(shape)]
  copy_qkvo(gated, plain)
  x, sc = inputs()
  assert not np.allclose(np.asarray(run(gated, x, sc)), 0.5 * np.asarray(run(plain, x, sc)))
  gated.wg[...] = jnp.zeros(shape)
  np.testing.assert_array_equal(np.asarray(run(gated, x, sc)),
                                0.5 * np.asarray(run(plain, x, sc)))


def test_headwise_is_elementwise_with_each_column_repeated_over_head_dim():
  head, elem = attention('headwise'), attention('elementwise', seed=1)
  copy_qkvo(head, elem)
  elem.wg[...] = jnp.repeat(head.wg[...][..., None], K, axis=-1)
  x, sc = inputs()
  np.testing.assert_allclose(np.asarray(run(elem, x, sc)), np.asarray(run(head, x, sc)),
                             rtol=1e-6, atol=1e-7)


def test_imp_encoder_attention_is_gated_too():
  c = imp_config.get_config('tiny,attn_gate=headwise')
  spec = imp.spec_from_config(c.model, param_dtype='float32', compute_dtype='float32')
  gated = imp.EncoderAttention(spec, rngs=nnx.Rngs(0))
  plain = imp.EncoderAttention(dataclasses.replace(spec, attn_gate='none'), rngs=nnx.Rngs(1))
  assert plain.wg is None and gated.wg.shape == (spec.embed_dim, spec.num_heads)
  copy_qkvo(gated, plain)  # (the QK-norm scales are ones in both)
  gated.wg[...] = jnp.zeros_like(gated.wg[...])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, spec.embed_dim)), jnp.float32)
  mask = jnp.ones((2, 5, 5), bool)
  np.testing.assert_allclose(np.asarray(gated(x, mask)), 0.5 * np.asarray(plain(x, mask)),
                             rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# Whole decoders: parameters, sharding, MoT's modalities, decoding.


def config(module, arg, **overrides):
  c = tiny_config(module.get_config(arg), **overrides)
  if c.model.family == 'mot':
    c.model.mot.moe.mlp_dim = 64
  return c


@pytest.mark.parametrize('module, arg, per_layer', [
    (dense, 'tiny,attn_gate=headwise', 64 * 4),
    (moma, 'tiny,mod=1,attn_gate=elementwise', 64 * 4 * 16),
    (mot_config, 'tiny,attn_gate=headwise', 2 * 64 * 4),  # untied: one W_g per modality
    (mot_config, 'tiny,untie=ffn,attn_gate=elementwise', 64 * 4 * 16),
])
def test_parameter_count_includes_the_gate(module, arg, per_layer):
  c = config(module, arg)
  ungated = config(module, arg.replace(arg.split('attn_gate=')[1], 'none'))
  mesh = partitioning.make_mesh(c.mesh, devices=jax.devices()[:1])
  params = state_lib.state_layout(c, mesh).abstract['params']
  spec = state_lib.model_spec(c)
  assert state_lib.count_params(params) == transformer.param_count(spec)
  extra = transformer.param_count(spec) - transformer.param_count(state_lib.model_spec(ungated))
  assert extra == c.model.num_layers * per_layer
  names = {'/'.join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
  assert sum(n.endswith('wg') for n in names) == c.model.num_layers
  none_params = state_lib.state_layout(ungated, mesh).abstract['params']
  assert not any('wg' in '/'.join(map(str, p)) for p, _ in nnx.to_flat_state(none_params))


@pytest.mark.parametrize('module, arg', [
    (dense, 'tiny,attn_gate=elementwise'),
    (mot_config, 'tiny,qk_norm=1,attn_gate=headwise'),  # sorted rows, untied W_g
])
def test_sharded_equals_unsharded(module, arg):
  ref_loss, ref_grads, _ = loss_and_grads(config(module, arg, **{'mesh.data': 1}),
                                          jax.devices()[:1])
  loss, grads, _ = loss_and_grads(config(module, arg, **{'mesh.data': 2, 'mesh.tensor': 2}),
                                  jax.devices()[:4])
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               grads, ref_grads)
  wg = [g for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
        if 'wg' in jax.tree_util.keystr(path)]
  assert wg and all(np.any(g != 0) for g in wg)


@pytest.mark.parametrize('arg', ['tiny,attn_gate=elementwise',
                                 'tiny,untie=ffn,attn,moe=text,attn_gate=headwise'])
def test_mot_gate_of_a_modality_is_used_only_by_its_tokens(arg):
  c = config(mot_config, arg, **{'mesh.data': 1})
  model = state_lib.make_model(c, 0)
  assert model.blocks[0].wg.out_sharding[0] == 'modality'
  graphdef, params = nnx.split(model)
  batch = {k: jnp.asarray(v) for k, v in random_batch(c.batch_size, c.seq_len, 3).items()}
  text_only = dict(batch)
  text_only['tokens'] = jnp.where(batch['modality'] == 1, tokenizer.TEXT_OFFSET + 5,
                                  batch['tokens'])
  text_only['modality'] = jnp.zeros_like(batch['modality'])
  grads = jax.jit(jax.grad(lambda p: step_lib.loss_fn(p, graphdef, text_only, 2)[0]))(params)
  for block in nnx.to_pure_dict(grads)['blocks'].values():
    g = np.asarray(block['wg'])
    assert np.all(g[1] == 0)  # the image gate: exactly zero without image tokens
    assert np.any(g[0] != 0)


@pytest.mark.parametrize('module, arg', [(dense, 'tiny,attn_gate=elementwise'),
                                         (mot_config, 'tiny,qk_norm=1,attn_gate=headwise')])
def test_cached_decoding_equals_the_full_causal_pass(module, arg):
  c = config(module, arg)
  c.seq_len = 16
  model = state_lib.make_model(c, 0)
  tokens = jnp.asarray(random_batch(4, c.seq_len, seed=5)['tokens'])
  T = tokens.shape[1]
  want = np.asarray(full_logits(model, tokens))
  got = cached_logits(model, tokens, 5, T + 3)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------
# Attention statistics for eval.json `attention`.


def test_sink_share_of_hand_built_cases():
  rng = np.random.default_rng(0)
  k = jnp.asarray(rng.normal(size=(1, 4, 1, K)), jnp.float32)
  # Zero queries attend uniformly over their t + 1 causal keys: key 0 gets 1 / (t + 1).
  got = layers.sink_share(jnp.zeros((1, 4, 2, K)), k)
  np.testing.assert_allclose(np.asarray(got), [[1, 1 / 2, 1 / 3, 1 / 4]], rtol=1e-6)
  # Random scores: the probability dot_product_attention gives key 0 (values = [key is 0]).
  q = jnp.asarray(rng.normal(size=(2, 6, H, K)) * 3, jnp.float32)
  kk = jnp.asarray(rng.normal(size=(2, 6, G, K)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 6, 6)) < 0.7) | jnp.eye(6, dtype=bool)
  v = jnp.zeros((2, 6, G, K)).at[:, 0, :, 0].set(1.0)
  o = jax.nn.dot_product_attention(q, kk, v, mask=mask[:, None], is_causal=True)
  np.testing.assert_allclose(np.asarray(layers.sink_share(q, kk, mask)),
                             np.asarray(o[..., 0].mean(-1)), rtol=1e-5, atol=1e-6)


def _zero_queries(model):
  """W_Q = 0 in every layer: every query attends uniformly over its causal keys."""
  for block in model.blocks:
    attn = getattr(block, 'attn', block)
    attn.wq[...] = jnp.zeros_like(attn.wq[...])


@pytest.mark.parametrize('module, arg', [(dense, 'tiny,attn_gate=headwise'),
                                         (mot_config, 'tiny')])
def test_decoder_attention_stats_of_uniform_attention(module, arg):
  c = config(module, arg)
  model = state_lib.make_model(c, 0)
  _zero_queries(model)
  graphdef, params = nnx.split(model)
  batch = {k: jnp.asarray(v) for k, v in random_batch(c.batch_size, c.seq_len, 3).items()}
  batch['tokens'] = batch['tokens'].at[-1].set(tokenizer.PAD)  # an all-padding row

  @jax.jit
  def stats_and_stream(params, batch):
    m = nnx.merge(graphdef, params)
    logits, aux = m(batch, attention_stats=True)
    # The residual stream after each block, by hand, in the original order.
    mod = batch['modality']
    sc = layers.rope_tables(jnp.broadcast_to(jnp.arange(c.seq_len), mod.shape),
                            c.model.head_dim, c.model.rope_theta)
    family = families.get(c.model.family)
    x, outs = family.stream_in(m, m.embed(batch['tokens']), mod), []
    for block in m.blocks:
      x, _ = block(x, sc, None, modality=mod)
      outs.append(family.stream_out(m, x, mod))
    return logits, aux, jnp.stack(outs)
  stat_logits, aux, stream = jax.device_get(stats_and_stream(params, batch))
  assert not any(k.startswith('layer_') for k in aux)
  valid = np.asarray(batch['tokens']) != tokenizer.PAD
  t = np.arange(c.seq_len)
  w = valid & (t > 0)
  L = c.model.num_layers
  np.testing.assert_allclose(aux['attention/sink_count'], L * w.sum())
  np.testing.assert_allclose(aux['attention/sink_sum'], L * (w / (t + 1)).sum(), rtol=1e-5)
  want_peak = np.abs(stream * valid[None, :, :, None]).max()
  np.testing.assert_allclose(aux['attention/max_activation'], want_peak, rtol=1e-6)
  # Without the flag: no statistics, and the same logits.
  logits, plain_aux = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b))(params, batch)
  assert not any(k.startswith('attention/') for k in plain_aux)
  np.testing.assert_array_equal(np.asarray(logits), stat_logits)


def test_eval_lm_reports_attention_for_an_ungated_model():
  c = config(dense, 'tiny', **{'data.tfds_name': 'not_embedded', 'mesh.data': 1})
  mesh = partitioning.make_mesh(c.mesh, devices=jax.devices()[:1])
  layout = state_lib.state_layout(c, mesh)
  params = state_lib.init_state(c, layout)['params']
  ctx = evaluate.EvalContext(c, '', mesh, layout, params, 0, None)
  lm = evaluate.LMEval(ctx)
  for seed in (1, 2):
    batch = random_batch(c.eval.batch_size, c.seq_len, seed)
    lm.add(batch, {k: jnp.asarray(v) for k, v in batch.items()})
  report = {'modalities': {}}
  lm.finish(report)
  att = report['attention']
  assert set(att) == {'sink_share', 'max_activation'} and 'routing' not in report
  assert 0 < att['sink_share'] < 1 and att['max_activation'] > 0
  assert evaluate.attention_report({'attention/sink_sum': 3.0, 'attention/sink_count': 12.0,
                                    'attention/max_activation': 7.0}) == {
      'sink_share': 0.25, 'max_activation': 7.0}


# ---------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize('make', [
    lambda: tiny_config(**{'model.attn_gate': 'sigmoid'}),
    lambda: dense.get_config('tiny,attn_gate=sigmoid'),
    lambda: mot_config.get_config('tiny,untie=ffn,attn,attn_gate=sigmoid'),
])
def test_an_unknown_gate_fails_in_one_line_naming_the_key(make):
  with pytest.raises(ValueError) as e:
    validate(make(), 8)
  msg = str(e.value)
  assert "config.model.attn_gate='sigmoid' is not one of" in msg and '\n' not in msg


def test_imp_validation_names_the_key_too():
  from projects.imp import validate as imp_validate
  c = imp_config.get_config('tiny,attn_gate=sigmoid')
  with pytest.raises(ValueError, match=r"config\.model\.attn_gate='sigmoid'"):
    imp_validate.validate(c, 8)


def test_config_defaults_and_old_checkpoints_mean_no_gate():
  from training import checkpoint
  assert dense.get_config('tiny').model.attn_gate == 'none'
  assert moma.get_config('tiny,attn_gate=headwise').model.attn_gate == 'headwise'
  assert mot_config.get_config('tiny,untie=ffn,attn,attn_gate=elementwise').model.mot.untie \
      == 'ffn,attn'
  saved = dense.get_config('tiny').to_dict()
  del saved['model']['attn_gate']
  assert checkpoint.config_from_saved(saved).model.attn_gate == 'none'
  assert not checkpoint.config_changes(saved, dense.get_config('tiny'))
