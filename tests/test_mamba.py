"""Mamba and Mixture-of-Mamba (models/mamba.py): the chunked scan, the token-by-token
recurrence, decoding with the cache and a float64 reference agree; untying is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import mamba, ssm

D, L = 16, 13


def mixer(untie=(), chunk=4, seed=0):
  spec = mamba.MambaSpec(state=4, conv=3, expand=2, chunk=chunk, untie=frozenset(untie))
  return mamba.Mixer(spec, embed_dim=D, dtype=jnp.float32, param_dtype=jnp.float32,
                     rngs=nnx.Rngs(params=seed))


def inputs(B=2, seed=1):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  modality = jnp.asarray(rng.integers(0, 2, (B, L)), jnp.int32)  # switches mid-sequence
  return h, modality


def numpy_scan(delta, A, Bm, Cm, x):
  delta, A, Bm, Cm, x = (np.asarray(t, np.float64) for t in (delta, A, Bm, Cm, x))
  Bsz, T, E = x.shape
  s = np.zeros((Bsz, E, A.shape[1]))
  y = np.zeros((Bsz, T, E))
  for t in range(T):
    s = np.exp(delta[:, t, :, None] * A) * s + (delta[:, t, :, None] * Bm[:, t, None, :]
                                                 * x[:, t, :, None])
    y[:, t] = np.einsum('ben,bn->be', s, Cm[:, t])
  return y, s


@pytest.mark.parametrize('scan', ['associative', 'sequential'])
@pytest.mark.parametrize('chunk', [1, 4, 5, 64])
def test_chunked_scan_equals_the_recurrence_and_float64(chunk, scan):
  rng = np.random.default_rng(0)
  B, E, N = 2, 6, 4
  delta = jnp.asarray(rng.uniform(0.01, 0.5, (B, L, E)), jnp.float32)
  A = -jnp.asarray(rng.uniform(0.5, 4, (E, N)), jnp.float32)
  Bm, Cm, x = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((B, L, N), (B, L, N), (B, L, E)))
  y, s = jax.jit(lambda *a: ssm.selective_scan(*a, chunk=chunk, scan=scan))(
      delta, A, Bm, Cm, x)
  y_r, s_r = jax.jit(ssm.recurrent_scan)(delta, A, Bm, Cm, x)
  y_np, s_np = numpy_scan(delta, A, Bm, Cm, x)
  np.testing.assert_allclose(np.asarray(y), y_np, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y_r), y_np, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(s), s_np, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(s_r), s_np, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('scan,chunk,length', [
    ('sequential', 64, 37),  # blocks of SEQ_BLOCK = 16: 3 blocks, the last one padded
    ('sequential', 5, 13), ('sequential', 1, 4), ('associative', 4, 13)])
def test_scan_gradients_equal_the_differentiated_recurrence(scan, chunk, length):
  """Every input's gradient (the initial state's too), with cotangents on y and on the
  final state: the sequential form's hand-written backward pass and the associative form's
  equal JAX's gradient of the token-by-token recurrence."""
  rng = np.random.default_rng(3)
  B, E, N = 2, 6, 4
  f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  args = (jnp.asarray(rng.uniform(0.01, 0.8, (B, length, E)), jnp.float32),
          -jnp.asarray(rng.uniform(0.5, 4, (E, N)), jnp.float32),
          f32(B, length, N), f32(B, length, N), f32(B, length, E), f32(B, E, N))
  cot_y, cot_s = f32(B, length, E), f32(B, E, N)

  def loss(fn):
    def f(delta, A, Bm, Cm, x, s0):
      y, s = fn(delta, A, Bm, Cm, x, s0)
      return jnp.sum(y * cot_y) + jnp.sum(s * cot_s)
    return jax.jit(jax.grad(f, argnums=tuple(range(6))))

  grads = loss(lambda *a: ssm.selective_scan(*a[:5], chunk=chunk, state_BEN=a[5],
                                             scan=scan))(*args)
  ref = loss(ssm.recurrent_scan)(*args)
  for name, g, r in zip(('delta', 'A', 'B', 'C', 'x', 'state'), grads, ref):
    scale = float(jnp.max(jnp.abs(r)))
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5 * scale,
                               err_msg=name)


def numpy_mixer(m, h, modality):
  """One Mixer in float64 numpy, token by token (untied weights picked per token)."""
  p = {k: np.asarray(v[...], np.float64) for k, v in nnx.to_pure_dict(nnx.state(m)).items()}
  spec = m.spec
  pick = lambda name, part, mod: p[name][mod] if part in spec.untie else p[name]  # noqa
  h, modality = np.asarray(h, np.float64), np.asarray(modality)
  B, T, _ = h.shape
  E, N, K, R = spec.inner(D), spec.state, spec.conv, spec.rank(D)
  silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
  out = np.zeros_like(h)
  A = -np.exp(p['A_log'])
  for b in range(B):
    xs, zs = np.zeros((T, E)), np.zeros((T, E))
    for t in range(T):
      xz = h[b, t] @ pick('in_proj', 'in', modality[b, t]).reshape(D, 2 * E)
      xs[t], zs[t] = xz[:E], xz[E:]
    s = np.zeros((E, N))
    for t in range(T):
      conv = p['conv_b'] + sum(p['conv_w'][:, k] * xs[t - K + 1 + k]
                               for k in range(K) if t - K + 1 + k >= 0)
      xc = silu(conv)
      mod = modality[b, t]
      dbc = xc @ pick('x_proj', 'x', mod)
      dt, Bt, Ct = dbc[:R], dbc[R:R + N], dbc[R + N:]
      delta = np.log1p(np.exp(dt @ pick('dt_w', 'dt', mod) + pick('dt_b', 'dt', mod)))
      s = np.exp(delta[:, None] * A) * s + delta[:, None] * Bt[None, :] * xc[:, None]
      y = s @ Ct + p['D'] * xc
      out[b, t] = (y * silu(zs[t])) @ pick('out_proj', 'out', mod)
  return out


@pytest.mark.parametrize('untie', [(), ('in', 'x', 'dt', 'out'), ('dt',)])
def test_mixer_equals_a_float64_token_loop_and_cached_decoding(untie):
  m = mixer(untie)
  h, modality = inputs()
  full, _ = jax.jit(lambda h, mod: m(h, mod))(h, modality)
  np.testing.assert_allclose(np.asarray(full), numpy_mixer(m, h, modality), atol=2e-5,
                             rtol=2e-5)
  # A prefill of 5 tokens, then one token per call with the cache: the same outputs.
  cache = mamba.init_mamba_cache(m.spec, 2, D, jnp.float32)
  step = jax.jit(lambda h, mod, c: m(h, mod, c))
  outs = []
  out, cache = step(h[:, :5], modality[:, :5], cache)
  outs.append(out)
  for t in range(5, L):
    out, cache = step(h[:, t:t + 1], modality[:, t:t + 1], cache)
    outs.append(out)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full),
                             atol=2e-5, rtol=2e-5)


def test_untied_with_equal_copies_is_the_dense_mixer():
  dense, untied = mixer(()), mixer(mamba.UNTIE)
  p_dense = nnx.to_pure_dict(nnx.state(dense))
  p = nnx.to_pure_dict(nnx.state(untied))
  for k, v in p_dense.items():
    p[k] = jnp.broadcast_to(v, p[k].shape) if p[k].shape != v.shape else v
  nnx.update(untied, p)
  h, modality = inputs()
  np.testing.assert_allclose(np.asarray(untied(h, modality)[0]),
                             np.asarray(dense(h, modality)[0]), atol=1e-6, rtol=1e-6)


def test_a_modality_absent_from_the_batch_gets_no_gradient_but_shared_parts_do():
  m = mixer(mamba.UNTIE)
  graphdef, params = nnx.split(m)
  h, _ = inputs()
  text_only = jnp.zeros((2, L), jnp.int32)

  def loss(params):
    out, _ = nnx.merge(graphdef, params)(h, text_only)
    return jnp.sum(out ** 2)
  g = nnx.to_pure_dict(jax.grad(loss)(params))
  for name in ('in_proj', 'x_proj', 'dt_w', 'dt_b', 'out_proj'):
    assert np.all(np.asarray(g[name][1]) == 0), name  # image copies: exactly zero
    assert np.any(np.asarray(g[name][0]) != 0), name
  for name in ('conv_w', 'conv_b', 'A_log', 'D'):
    assert np.any(np.asarray(g[name]) != 0), name


@pytest.mark.parametrize('untie', [(), ('in',), ('x', 'dt'), mamba.UNTIE])
def test_each_untie_subset_unties_exactly_what_it_names(untie):
  p = nnx.to_pure_dict(nnx.state(mixer(untie)))
  names = {'in': ('in_proj',), 'x': ('x_proj',), 'dt': ('dt_w', 'dt_b'), 'out': ('out_proj',)}
  tied = {'in_proj': 3, 'x_proj': 2, 'dt_w': 2, 'dt_b': 1, 'out_proj': 2, 'conv_w': 2,
          'conv_b': 1, 'A_log': 2, 'D': 1}
  untied = {n for part in untie for n in names[part]}
  for name, ndim in tied.items():
    assert p[name].ndim == ndim + (name in untied), name
    if name in untied:
      assert p[name].shape[0] == 2


def test_bad_spec_is_one_clear_error():
  with pytest.raises(ValueError, match=r"model.mamba.untie names \['ffn'\]"):
    mamba.check_spec(mamba.MambaSpec(untie=frozenset({'ffn'})))
  with pytest.raises(ValueError, match='model.mamba.chunk must be >= 1'):
    mamba.check_spec(mamba.MambaSpec(chunk=0))
  with pytest.raises(ValueError, match="model.mamba.scan='fast' is not one of"):
    mamba.check_spec(mamba.MambaSpec(scan='fast'))


def test_a_log_and_d_get_no_weight_decay():
  from training import state as state_lib
  mask = state_lib.decay_mask(nnx.state(mixer(mamba.UNTIE)))
  flat = {state_lib.param_path(k).split('/')[0]: v
          for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat == {'A_log': False, 'D': False, 'conv_b': False, 'conv_w': True,
                  'dt_b': False, 'dt_w': True, 'in_proj': True, 'out_proj': True,
                  'x_proj': True}


@pytest.mark.parametrize('arg', ['tiny', 'tiny,untie=all,attn_every=2'])
def test_the_mamba_family_counts_its_parameters_and_trains(arg, data_dir, tmp_path):
  from configs import mamba as mamba_config
  from models import transformer
  from training import loop, state as state_lib
  from tests.helpers import tiny_config
  config = tiny_config(mamba_config.get_config(arg), **{
      'data.data_dir': data_dir, 'total_steps': 4, 'warmup_steps': 1, 'log_every': 2,
      'checkpoint_every': 4, 'model.mamba.chunk': 8})
  params = nnx.state(state_lib.make_model(config, 0))
  assert state_lib.count_params(params) == transformer.param_count(state_lib.model_spec(config))
  scalars = loop.train(config, str(tmp_path))
  assert np.isfinite(scalars['train/loss'])


HYBRID_MOE = 'tiny,untie=all,attn_every=2,ffn=moe,experts=4,k=2,chunk=8'


def test_the_hybrid_with_moe_ffns_counts_trains_decodes_and_reports_routing(data_dir,
                                                                           tmp_path):
  """`ffn=moe`: the hybrid's attention layers get the MoE layer (its metrics as the block's,
  aux losses included), parameter counts match the built model, it trains, and a prefill
  plus cached steps give the full causal pass (tests/test_decode.py's harness)."""
  from configs import mamba as mamba_config
  from models import dense, families, family as family_lib, transformer
  from moe import layer as moe_layer
  from training import loop, state as state_lib
  from tests.helpers import random_batch, tiny_config
  from tests.test_decode import cached_logits, full_logits
  config = tiny_config(mamba_config.get_config(HYBRID_MOE), **{
      'data.data_dir': data_dir, 'total_steps': 4, 'warmup_steps': 1, 'log_every': 2,
      'checkpoint_every': 4, 'model.mamba.moe.mlp_dim': 64})
  spec = state_lib.model_spec(config)
  model = state_lib.make_model(config, 0)
  assert [type(b).__name__ for b in model.blocks] == ['MambaBlock', 'Block']
  assert isinstance(model.blocks[1], dense.Block)
  assert isinstance(model.blocks[1].ffn, moe_layer.MoELayer)
  assert state_lib.count_params(nnx.state(model)) == transformer.param_count(spec)
  family = families.get('mamba')
  attention = family_lib.attention_and_norm_params(spec)
  router = 64 * 4
  assert family.layer_params(spec, 1, False) == attention + 4 * 3 * 64 * 64 + router
  assert family.layer_params(spec, 1, True) == attention + 2 * 3 * 64 * 64 + router  # k = 2
  assert family.decode_unsupported(spec) is None

  batch = {k: jnp.asarray(v) for k, v in random_batch(4, 24, seed=3).items()}
  _, aux = model(batch, jax.random.key(0))
  assert {'layer_1/aux_loss', 'layer_1/expert_load'} <= set(aux)
  assert not [k for k in aux if k.startswith('layer_0/')]  # the Mamba block reports nothing
  assert float(aux['layer_1/aux_loss']) > 0

  tokens = batch['tokens']
  want = np.asarray(full_logits(model, tokens))
  got = cached_logits(model, tokens, 7, max_len=tokens.shape[1] + 5)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)

  scalars = loop.train(config, str(tmp_path))
  assert np.isfinite(scalars['train/loss'])


def test_moe_ffn_settings_are_checked():
  from configs import mamba as mamba_config
  from models import families
  from training import state as state_lib
  from training.validate import validate
  with pytest.raises(ValueError, match='ffn=moe.*attn_every > 0'):
    validate(mamba_config.get_config('tiny,ffn=moe'), 1)
  c = mamba_config.get_config('tiny,attn_every=2,ffn=mlp')
  with pytest.raises(ValueError, match=r"model.mamba.ffn='mlp' is not one of"):
    validate(c, 1)
  c = mamba_config.get_config('tiny,attn_every=2,ffn=moe')
  c.model.mamba.moe.router, c.model.mamba.moe.dispatch = 'expert_choice', 'capacity'
  validate(c, 1)
  reason = families.get('mamba').decode_unsupported(state_lib.model_spec(c))
  assert 'model.mamba.moe.router' in reason


HYBRID_MOMA = 'tiny,untie=all,attn_every=2,ffn=moma,groups=2t3i,chunk=8'


def test_the_hybrid_with_moma_ffns_counts_trains_its_aux_routers_and_evaluates_causally(
    data_dir, tmp_path):
  """`ffn=moma`: the hybrid's attention layers are MoMa blocks (modality-grouped expert
  choice, pre-norm); parameter counts match the built model; the main stage trains, the
  aux stage trains only the auxiliary routers, and eval reports the causal pass and each
  modality's load on its own group only."""
  from configs import mamba as mamba_config
  from models import families, transformer
  from training import evaluate, loop, state as state_lib
  from tests.helpers import tiny_config
  overrides = {'data.data_dir': data_dir, 'total_steps': 4, 'warmup_steps': 1,
               'log_every': 2, 'checkpoint_every': 4, 'model.mamba.moma.mlp_dim': 64,
               'eval.num_examples': 16}
  config = tiny_config(mamba_config.get_config(HYBRID_MOMA), **overrides)
  spec = state_lib.model_spec(config)
  model = state_lib.make_model(config, 0)
  assert [type(b).__name__ for b in model.blocks] == ['MambaBlock', 'MoMaBlock']
  assert spec.moma.norm == 'pre' and [g.experts for g in spec.moma.groups] == [2, 3]
  assert state_lib.count_params(nnx.state(model)) == transformer.param_count(spec)
  family = families.get('mamba')
  assert family.layer_params(spec, 1, True) == (
      family.layer_params(spec, 1, False) - 4 * 3 * 64 * 64  # 5 experts, 1 active per token
      - sum(64 * 32 + 32 * n for n in (2, 3)))  # the aux routers: not active
  assert family.expert_names(spec) == ['text/0', 'text/1', 'image/0', 'image/1', 'image/2']
  assert 'moma text:2 image:3 expert_choice F=64' in family.layer_summary(spec, 1)

  loop.train(config, str(tmp_path))
  aux = tiny_config(mamba_config.get_config(HYBRID_MOMA + ',stage=aux'), **{
      **overrides, 'total_steps': 2, 'checkpoint_every': 2})
  loop.train(aux, str(tmp_path))
  report = evaluate.evaluate(config, str(tmp_path))
  assert report['aux_step'] == 2 and 'causal_loss_note' not in report  # main frozen exactly
  for mod in report['modalities'].values():
    assert np.isfinite(mod['causal_loss']) and mod['loss'] > 0
  (layer,) = report['routing']['layers']
  assert layer['layer'] == 1
  for key in ('load', 'causal_load'):
    assert layer[key]['text']['image/0'] == 0.0 and layer[key]['image']['text/1'] == 0.0


def test_moma_ffn_and_aux_stage_settings_are_checked():
  from configs import mamba as mamba_config
  from training.validate import validate
  with pytest.raises(ValueError, match='ffn=moma puts the MoMa FFN.*attn_every > 0'):
    validate(mamba_config.get_config('tiny,ffn=moma'), 1)
  with pytest.raises(ValueError, match=r"model.mamba.moma.groups='4x': 'x' names no modality"):
    validate(mamba_config.get_config('tiny,attn_every=2,ffn=moma,groups=4x'), 1)
  with pytest.raises(ValueError, match="stage='aux'.*this model has none"):
    validate(mamba_config.get_config('tiny,attn_every=2,ffn=moe,stage=aux'), 1)
  c = mamba_config.get_config('tiny,attn_every=2,ffn=moma,stage=aux')
  c.model.mamba.moma.router = 'topk'  # token choice is causal: no aux routers to train
  with pytest.raises(ValueError, match="stage='aux'.*this model has none"):
    validate(c, 1)
  c.model.mamba.moma.mlp_dim = 0
  with pytest.raises(ValueError, match='config.model.mamba.moma.mlp_dim must be a positive'):
    validate(c, 1)


def test_sharded_training_loss_and_grads_equal_unsharded():
  """On a mesh the untied projections run per batch shard (core/partitioning.per_shard):
  each device lays out its own rows, fsdp-gathered weights, row-parallel x_proj/out_proj
  summed over 'tensor'. Loss and every gradient equal the one-device run's."""
  from configs import mamba as mamba_config
  from core import partitioning
  from tests.helpers import loss_and_grads, tiny_config
  shape = (2, 2, 1, 2)  # data, fsdp, expert, tensor
  config = lambda **mesh: tiny_config(mamba_config.get_config('tiny,untie=all'), **{  # noqa
      'model.mamba.chunk': 8, 'seq_len': 24, **mesh})
  ref_loss, ref_grads, _ = loss_and_grads(config(**{'mesh.data': 1}), jax.devices()[:1])
  loss, grads, _ = loss_and_grads(
      config(**{f'mesh.{a}': s for a, s in zip(partitioning.MESH_AXES, shape)}),
      jax.devices())
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               grads, ref_grads)
