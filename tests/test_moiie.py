"""MoIIE (models/moiie.py, moe/moiie.py): per-modality routers over own + shared experts
against a per-token loop, modality isolation through gradients, the load-balance loss by
hand, exact upcycling from dense, config errors, decoding, sharding, and a short run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import moiie as moiie_config
from core import partitioning
from models import moiie, transformer
from moe import moiie as moiie_routing, routing
from tests.helpers import loss_and_grads, random_batch, tiny_config
from training import evaluate, loop, state as state_lib
from training.validate import validate

TEXT, IMAGE = 0, 1
D, F = 16, 8


def moiie_tiny(arg='tiny', **overrides):
  return tiny_config(moiie_config.get_config(arg), **{'model.moiie.mlp_dim': 128, **overrides})


def ffn(experts=(4, 4), shared=2, k=2, jitter=0.0, seed=0):
  pool = moiie_routing.Pool(modalities=('text', 'image'), experts=experts, shared=shared)
  spec = moiie.MoIIESpec(pool=pool, mlp_dim=F, k=k, jitter=jitter)
  return moiie.MoIIEFFN(spec, embed_dim=D, dtype=jnp.float32, param_dtype=jnp.float32,
                        rngs=nnx.Rngs(params=seed))


def inputs(B=2, T=24, seed=1, p_image=0.4):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  modality = jnp.asarray(rng.random((B, T)) < p_image, jnp.int32)
  return x, modality


def run(layer, x, modality, rng=None):
  graphdef, params = nnx.split(layer)
  return jax.jit(lambda p, x, m, r: nnx.merge(graphdef, p)(x, m, r))(params, x, modality, rng)


def swiglu64(x, wg, wu, wd):
  g, u = x @ wg, x @ wu
  return (g / (1 + np.exp(-g)) * u) @ wd


def reference(layer, x, modality, router_in=None):
  """Per token: softmax over its modality's candidates (own experts, then shared), top-k by
  logit (ties: lower index), weights renormalised over the k, sum of the k experts."""
  pool, k = layer.spec.pool, layer.spec.k
  w_r = np.asarray(layer.router[...], np.float64)
  ex = {n: np.asarray(getattr(layer.experts, n)[...], np.float64)
        for n in ('w_gate', 'w_up', 'w_down')}
  x64 = np.asarray(x, np.float64)
  r64 = x64 if router_in is None else np.asarray(router_in, np.float64)
  out = np.zeros_like(x64)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      m = int(modality[b, t])
      cand = pool.candidates(m)
      logits = r64[b, t] @ w_r[:, pool.router_cols(m)]
      p = np.exp(logits - logits.max())
      p /= p.sum()
      top = sorted(range(len(cand)), key=lambda j: (-logits[j], j))[:k]
      w = p[top] / p[top].sum()
      for j, wj in zip(top, w):
        e = cand[j]
        out[b, t] += wj * swiglu64(x64[b, t], ex['w_gate'][e], ex['w_up'][e], ex['w_down'][e])
  return out


@pytest.mark.parametrize('experts, shared, k', [((4, 4), 2, 2), ((2, 3), 2, 3), ((1, 2), 0, 1),
                                                ((3, 1), 1, 2)])
def test_ffn_equals_a_per_token_loop(experts, shared, k):
  layer = ffn(experts, shared, k)
  x, modality = inputs()
  y, metrics = run(layer, x, modality)
  np.testing.assert_allclose(np.asarray(y), reference(layer, x, modality), atol=1e-5,
                             rtol=1e-5)
  load = np.asarray(metrics['load'])  # [M, E]: a row sums to k; nothing on the other's own
  np.testing.assert_allclose(load.sum(axis=1), [k, k], rtol=1e-6)
  pool = layer.spec.pool
  assert not load[TEXT, list(pool.own(IMAGE))].any()
  assert not load[IMAGE, list(pool.own(TEXT))].any()


def test_jitter_scales_the_router_input_only_and_only_with_an_rng():
  layer = ffn(jitter=0.3)
  x, modality = inputs(seed=3)
  rng = jax.random.key(7)
  y_eval, _ = run(layer, x, modality)
  np.testing.assert_allclose(np.asarray(y_eval), reference(layer, x, modality), atol=1e-5)
  y_train, _ = run(layer, x, modality, rng)
  jittered = routing.jitter(x, rng, 0.3)
  np.testing.assert_allclose(np.asarray(y_train), reference(layer, x, modality, jittered),
                             atol=1e-5, rtol=1e-5)
  assert not np.allclose(np.asarray(y_train), np.asarray(y_eval), atol=1e-4)


def _grads(layer, x, modality):
  graphdef, params = nnx.split(layer)
  probe = jax.random.normal(jax.random.key(2), x.shape)

  def loss(p):
    y, metrics = nnx.merge(graphdef, p)(x, modality, jax.random.key(0))
    return jnp.sum(y * probe) + metrics['aux_loss']
  return nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))


def test_own_experts_learn_only_from_their_modality_shared_from_both():
  layer = ffn(jitter=0.01)
  pool = layer.spec.pool
  own = {m: list(pool.own(m)) for m in (TEXT, IMAGE)}
  shared = list(range(sum(pool.experts), pool.num_experts))
  x, _ = inputs(B=2, T=32, seed=5)
  for m, other in ((TEXT, IMAGE), (IMAGE, TEXT)):
    g = _grads(layer, x, jnp.full(x.shape[:2], m, jnp.int32))
    norms = np.sqrt(sum(np.square(np.asarray(w)).sum(axis=(1, 2))
                        for w in g['experts'].values()))  # [E]
    assert np.all(norms[own[other]] == 0.0), (m, norms)  # exactly zero
    assert np.all(norms[own[m]] > 0), (m, norms)
    assert np.all(norms[shared] > 0), (m, norms)
    router = np.asarray(g['router'])  # the other modality's router gets nothing
    assert not router[:, pool.router_cols(other)].any()
    assert router[:, pool.router_cols(m)].any()


def test_load_balance_loss_by_hand():
  """1 text + 1 image expert + 1 shared: text candidates (0, 2), image (1, 2)."""
  pool = moiie_routing.Pool(modalities=('text', 'image'), experts=(1, 1), shared=1)
  l3, l9, l4 = np.log(3.0), np.log(9.0), np.log(4.0)
  # Router columns: text (expert 0, shared 2), image (expert 1, shared 2).
  logits = jnp.asarray([[[l3, 0, 0, 0], [0, l3, 0, 0], [0, 0, l4, 0], [l9, 0, 0, 0]]],
                       jnp.float32)
  modality = jnp.asarray([[TEXT, TEXT, IMAGE, TEXT]], jnp.int32)
  route, metrics = moiie_routing.route(pool, logits, modality, k=1, load_balance_coef=0.5)
  # text: p = (.75, .25), (.25, .75), (.9, .1); top-1 = 0, 2, 0 -> f = (2/3, 1/3),
  # P = (1.9/3, 1.1/3), L = 2 (2/3 1.9/3 + 1/3 1.1/3) = 9.8/9. image: p = (.8, .2),
  # top-1 = 1 -> L = 2 * 1 * .8 = 1.6.
  want_text, want_image = 9.8 / 9, 1.6
  np.testing.assert_allclose(metrics['load_balance_loss_text'], want_text, rtol=1e-6)
  np.testing.assert_allclose(metrics['load_balance_loss_image'], want_image, rtol=1e-6)
  np.testing.assert_allclose(metrics['load_balance_loss'], want_text + want_image, rtol=1e-6)
  np.testing.assert_allclose(metrics['aux_loss'], 0.5 * (want_text + want_image), rtol=1e-6)
  assert np.asarray(route.expert).tolist() == [[0, 2, 1, 0]]
  np.testing.assert_allclose(route.weight, 1.0)  # k = 1: renormalised to 1
  # k = 2 over 2 candidates: the weights are p itself, in descending order.
  route, _ = moiie_routing.route(pool, logits, modality, k=2, load_balance_coef=0.5)
  np.testing.assert_allclose(np.asarray(route.weight).reshape(4, 2),
                             [[.75, .25], [.75, .25], [.8, .2], [.9, .1]], rtol=1e-6)
  # No image token in the batch: the image router's loss is 0.
  _, metrics = moiie_routing.route(pool, logits, jnp.zeros_like(modality), k=1,
                                   load_balance_coef=0.5)
  assert float(metrics['load_balance_loss_image']) == 0.0


def _noisy_params(config, seed):
  params = nnx.to_pure_dict(nnx.split(state_lib.make_model(config, seed))[1])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  return jax.device_get(tree.unflatten([x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)]))


def test_upcycled_from_dense_is_the_dense_model():
  dense_cfg, new_cfg = tiny_config(), moiie_tiny('tiny,groups=2t3i,shared=2,k=2')
  src_spec, new_spec = state_lib.model_spec(dense_cfg), state_lib.model_spec(new_cfg)
  src = _noisy_params(dense_cfg, 0)
  new_model = state_lib.make_model(new_cfg, 1)
  graphdef, fresh = nnx.split(new_model)
  params = jax.jit(lambda s, n: moiie.upcycle(src_spec, s, new_spec, n))(src, fresh)
  pure, fresh_pure = jax.device_get(nnx.to_pure_dict(params)), nnx.to_pure_dict(fresh)
  for i in range(new_cfg.model.num_layers):
    ffn_ = pure['blocks'][i]['ffn']
    if new_spec.ext.is_moe_layer(i):
      for name, w in ffn_['experts'].items():
        assert w.shape[0] == 7 and all(np.array_equal(e, src['blocks'][i]['ffn'][name])
                                       for e in w)
      assert np.array_equal(ffn_['router'], fresh_pure['blocks'][i]['ffn']['router'])
    else:
      assert ffn_.keys() == {'w_gate', 'w_up', 'w_down'}

  batch = {k: jnp.asarray(v) for k, v in random_batch(4, 32, seed=2).items()}
  dense_model = state_lib.make_model(dense_cfg, 0)
  nnx.update(dense_model, _state_like(dense_model, src))
  want = jax.jit(lambda b: dense_model(b)[0])(batch)
  moiie_model = nnx.merge(graphdef, params)
  for rng in (None, jax.random.key(3)):  # eval routing and training (jittered) routing
    got = jax.jit(lambda b, r: moiie_model(b, r)[0])(batch, rng)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def _state_like(model, pure):
  state = nnx.split(model)[1]
  nnx.replace_by_pure_dict(state, pure)
  return state


def test_upcycling_refuses_a_mismatched_source():
  new_spec = state_lib.model_spec(moiie_tiny())
  wide = state_lib.model_spec(tiny_config(**{'model.mlp_dim': 64}))
  with pytest.raises(ValueError, match='model.mlp_dim: source 64 vs 128'):
    moiie.check_compatible(wide, new_spec)
  with pytest.raises(ValueError, match="dense model, got a source of model.family='moiie'"):
    moiie.check_compatible(new_spec, new_spec)


def test_layers_params_and_counts():
  c = moiie_tiny('tiny,every=2')
  spec = state_lib.model_spec(c)
  params = nnx.to_pure_dict(nnx.split(state_lib.make_model(c, 0))[1])
  assert params['blocks'][0]['ffn']['w_up'].shape == (64, 128)  # dense SwiGLU
  assert params['blocks'][1]['ffn']['experts']['w_up'].shape == (10, 64, 128)  # 4 + 4 + 2
  assert params['blocks'][1]['ffn']['router'].shape == (64, 12)  # 6 text + 6 image columns
  assert state_lib.count_params(nnx.split(state_lib.make_model(c, 0))[1]) == \
      transformer.param_count(spec)
  dense_spec = state_lib.model_spec(tiny_config())
  moe_layer_active = spec.ext.k * 3 * 64 * 128 + 64 * 6  # k experts + one router
  assert (transformer.param_count(spec, active=True) - transformer.param_count(dense_spec)
          == moe_layer_active - 3 * 64 * 128)  # one MoIIE layer among 2
  assert moiie.FAMILY.expert_names(spec) == [f'text/{j}' for j in range(4)] + [
      f'image/{j}' for j in range(4)] + ['shared/0', 'shared/1']


@pytest.mark.parametrize('arg, overrides, message', [
    ('tiny,groups=4t', {}, "model.moiie.groups='4t' gives no experts to ['image']"),
    ('tiny,groups=4x4i', {}, "model.moiie.groups='4x4i': 'x' names no modality"),
    ('tiny,groups=4t1i,shared=1,k=3', {}, "k=3 is above the 2 candidates of modality 'image'"),
    ('tiny,groups=4t4i,shared=2', {'mesh.data': 2, 'mesh.expert': 4},
     'MoIIE has 10 experts a layer'),
    ('tiny,every=5', {}, 'every=5 leaves no MoIIE layer'),
    ('tiny', {'model.moiie.jitter': 1.0}, 'jitter must be in [0, 1)'),
    ('tiny', {'model.moiie.shared': -1}, 'shared must be an integer >= 0'),
    ('tiny', {'model.moiie.mlp_dim': 102, 'mesh.data': 2, 'mesh.tensor': 4},
     'mlp_dim=102 is not divisible by mesh.tensor=4'),
    ('tiny', {'model.moiie.k': 0}, 'k must be a positive integer, got 0'),
])
def test_bad_config_gives_one_clear_error(arg, overrides, message):
  c = moiie_config.get_config(arg)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(ValueError) as e:
    validate(c, 8)
  assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_config_arg_errors():
  with pytest.raises(ValueError, match="config arg k='0' must be an integer >= 1"):
    moiie_config.get_config('tiny,k=0')


# Cached decoding equals the full pass: tests/test_decode.py (its CONFIGS hold MoIIE).


EP_OVERRIDES = {'model.moiie.mlp_dim': 32, 'batch_size': 8}


@pytest.fixture(scope='module')
def one_device():
  loss, grads, _ = loss_and_grads(moiie_tiny(**EP_OVERRIDES, **{'mesh.data': 1}),
                                  jax.devices()[:1])
  return loss, grads


@pytest.mark.parametrize('shape', [(4, 1, 2, 1), (1, 2, 2, 2)])  # data, fsdp, expert, tensor
def test_expert_parallel_equals_single_device(shape, one_device):
  loss, grads, params = loss_and_grads(
      moiie_tiny(**EP_OVERRIDES, **{f'mesh.{a}': s for a, s in
                                    zip(partitioning.MESH_AXES, shape)}), jax.devices())
  np.testing.assert_allclose(loss, one_device[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               grads, one_device[1])
  w = params['blocks'][1]['ffn']['experts']['w_gate'][...]
  assert w.addressable_shards[0].data.shape[0] == 10 // shape[2]


def test_tiny_config_trains_and_reports_per_modality_loads(data_dir, tmp_path):
  config = moiie_tiny(**{'data.data_dir': data_dir, 'total_steps': 4, 'warmup_steps': 1,
                         'log_every': 2, 'checkpoint_every': 4, 'eval.num_examples': 16})
  scalars = loop.train(config, str(tmp_path))
  assert np.isfinite(scalars['train/loss'])
  report = evaluate.evaluate(config, str(tmp_path))
  layer = {entry['layer']: entry for entry in report['routing']['layers']}[1]
  load = layer['load']
  assert set(load) == {'text', 'image'} and set(load['text']) == set(
      moiie.FAMILY.expert_names(state_lib.model_spec(config)))
  assert all(load['text'][f'image/{j}'] == 0.0 for j in range(4))
  assert all(load['image'][f'text/{j}'] == 0.0 for j in range(4))
  for m in ('text', 'image'):
    np.testing.assert_allclose(sum(load[m].values()), 2.0, rtol=1e-5)  # k experts a token
  assert layer['load_balance_loss'] > 0


def test_warm_start_upcycles_a_dense_run_into_the_same_function(data_dir, tmp_path):
  """training/warm_start.upcycle_state with the MoIIE family's upcycler (`Family.upcycler`):
  the run's step-0 model computes the dense run's logits."""
  from training import warm_start
  common = {'data.data_dir': data_dir, 'total_steps': 2, 'warmup_steps': 1, 'log_every': 1,
            'checkpoint_every': 2, 'eval.num_examples': 16}
  dense_dir = str(tmp_path / 'dense')
  loop.train(tiny_config(**common), dense_dir)
  config = moiie_tiny(**common, upcycle_from=dense_dir)
  mesh = partitioning.make_mesh(config.mesh)
  layout = state_lib.state_layout(config, mesh)
  state, data_state, step = warm_start.upcycle_state(config, layout)
  assert step == 2 and data_state is not None and int(state['step']) == 0
  src_config, src_params, _, _ = warm_start.restore_params(dense_dir, mesh)
  batch = {k: jnp.asarray(v) for k, v in random_batch(8, config.seq_len, seed=4).items()}
  src_graphdef = state_lib.state_layout(src_config, mesh).graphdef
  want = nnx.merge(src_graphdef, src_params)(batch)[0]
  got = nnx.merge(layout.graphdef, state['params'])(batch, jax.random.key(1))[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
