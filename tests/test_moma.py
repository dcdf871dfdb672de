"""MoMa (models/moma.py) and mixture-of-depths (models/mod.py): routing against plain
references, modality isolation, causality of the auxiliary routers, sharded == unsharded."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import moma as moma_config
from core import partitioning
from models import mod as mod_lib, moma
from moe import dispatch
from tests.helpers import loss_and_grads, random_batch, tiny_config
from training import state as state_lib, step as step_lib

TEXT, IMAGE = 0, 1


def moma_tiny(arg='tiny', **overrides):
  c = tiny_config(base=moma_config.get_config(arg), **overrides)
  c.model.moma.mlp_dim = 32
  return c


def ffn(groups=(('text', 4), ('image', 4)), capacity=None, router='expert_choice', shared=0,
        D=16, F=8, seed=0, train_aux=False):
  gs = [moma.Group(n, e, capacity[i] if capacity else 1.0 / e, (i,))
        for i, (n, e) in enumerate(groups)]
  if shared:
    gs.append(moma.Group(moma.SHARED, shared, 1.0 / shared, (TEXT, IMAGE)))
  spec = moma.MoMaSpec(groups=tuple(gs), mlp_dim=F, router=router, train_aux=train_aux)
  return moma.MoMaFFN(spec, embed_dim=D, num_modalities=2, dtype=jnp.float32,
                      param_dtype=jnp.float32, rngs=nnx.Rngs(params=seed))


def inputs(B=2, T=24, D=16, seed=1, p_image=0.4):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  modality = jnp.asarray(rng.random((B, T)) < p_image, jnp.int32)
  return x, modality


def swiglu64(x, wg, wu, wd):
  g, u = x @ wg, x @ wu
  return (g / (1 + np.exp(-g)) * u) @ wd


def test_expert_choice_inside_each_group_equals_a_per_expert_loop():
  layer = ffn(capacity=(0.5, 0.25))  # text experts take half, image experts a quarter
  x, modality = inputs()
  y, aux = layer(x, modality)
  xs, mods = np.asarray(x, np.float64), np.asarray(modality)
  w_r = np.asarray(layer.router[...], np.float64)
  wg, wu, wd = (np.asarray(w[...], np.float64) for w in
                (layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down))
  ref = np.zeros_like(xs)
  counts = np.zeros((2, 8))
  for b in range(x.shape[0]):
    logits = xs[b] @ w_r
    for m, (offset, n, c) in enumerate(((0, 4, 0.5), (4, 4, 0.25))):
      members = np.flatnonzero(mods[b] == m)
      quota = math.ceil(len(members) * c)
      for j in range(offset, offset + n):
        # stable sort: ties go to the lower token index, as lax.top_k
        order = members[np.argsort(-logits[members, j], kind='stable')][:quota]
        for i in order:
          ref[b, i] += swiglu64(xs[b, i], wg[j], wu[j], wd[j]) / (1 + np.exp(-logits[i, j]))
          counts[m, j] += 1
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  members = np.array([(mods == m).sum() for m in (0, 1)])
  np.testing.assert_allclose(np.asarray(aux['load']), counts / members[:, None], rtol=1e-6)


def test_capacity_per_group_follows_the_config():
  layer = ffn(groups=(('text', 3), ('image', 2)), capacity=(1 / 3, 0.5))
  x, modality = inputs(B=3, T=40)
  logits = jnp.einsum('BTD,DE->BTE', x, layer.router[...])
  route, _ = moma.route(layer.spec, logits, modality, jnp.ones(modality.shape, bool))
  bound = route.max_per_expert
  sel = np.asarray(moma.selection(route))
  for b in range(3):
    b_text, b_image = int((modality[b] == 0).sum()), int((modality[b] == 1).sum())
    np.testing.assert_array_equal(sel[b].sum(0), [math.ceil(b_text / 3)] * 3
                                  + [math.ceil(b_image / 2)] * 2)
  assert bound == max(math.ceil(40 / 3), 20)


def test_no_token_reaches_another_modalitys_experts():
  layer = ffn(shared=0)
  x, modality = inputs(B=2, T=32)
  graphdef, params = nnx.split(layer)

  def loss_on(m):
    def f(p, x):
      y, _ = nnx.merge(graphdef, p)(x, modality)
      return jnp.sum(jnp.where((modality == m)[..., None], y, 0.0) ** 2)
    return f

  for m, other in ((TEXT, slice(4, 8)), (IMAGE, slice(0, 4))):
    g_params, g_x = jax.grad(loss_on(m), argnums=(0, 1))(params, x)
    for w in ('w_gate', 'w_up', 'w_down'):
      g = np.asarray(g_params['experts'][w][...])
      assert np.all(g[other] == 0), (m, w)  # exactly zero
      assert np.any(g[slice(0, 4) if m == TEXT else slice(4, 8)] != 0)
    assert np.all(np.asarray(g_params['router'][...])[:, other] == 0)
    # ... and no other-modality token influences this modality's outputs through the FFN
    assert np.all(np.asarray(g_x)[np.asarray(modality) != m] == 0)
  _, aux = layer(x, modality)
  load = np.asarray(aux['load'])
  assert np.all(load[TEXT, 4:] == 0) and np.all(load[IMAGE, :4] == 0)


def test_1t1i_is_the_modality_untied_ffn():
  layer = ffn(groups=(('text', 1), ('image', 1)))
  x, modality = inputs()
  y, aux = layer(x, modality)
  wg, wu, wd = (np.asarray(w[...], np.float64) for w in
                (layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down))
  m = np.asarray(modality)
  ref = np.where(m[..., None] == 0, swiglu64(np.asarray(x, np.float64), wg[0], wu[0], wd[0]),
                 swiglu64(np.asarray(x, np.float64), wg[1], wu[1], wd[1]))
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(aux['load']), [[1, 0], [0, 1]])


def test_token_choice_inside_groups_and_shared_pool():
  layer = ffn(router='topk', shared=2)
  x, modality = inputs()
  y, aux = layer(x, modality)
  load = np.asarray(aux['load'])  # [2, 10]: 4 text, 4 image, 2 shared
  np.testing.assert_allclose(load[TEXT, :4].sum(), 1.0, rtol=1e-6)  # top-1 in the group
  np.testing.assert_allclose(load[IMAGE, 4:8].sum(), 1.0, rtol=1e-6)
  assert np.all(load[TEXT, 4:8] == 0) and np.all(load[IMAGE, :4] == 0)
  # the pool routes token choice too: every token of either modality picks one pool expert
  np.testing.assert_allclose(load[:, 8:].sum(axis=1), [1.0, 1.0], rtol=1e-6)
  assert float(aux['aux_loss']) > 0  # Switch loss per group


def test_mod_sends_exactly_the_configured_fraction_and_skips_the_rest_unchanged():
  spec = mod_lib.MoDSpec(capacity=0.25, every=2, scale=True)
  D = 16
  m = mod_lib.MoD(spec, embed_dim=D, param_dtype=jnp.float32, rngs=nnx.Rngs(params=0),
                  aux_router=moma.AuxRouter(D, 1, param_dtype=jnp.float32,
                                            rngs=nnx.Rngs(params=1)))
  x, modality = inputs(B=3, T=32, D=D)
  sin_cos = (jnp.zeros((3, 32, 1, 2)), jnp.ones((3, 32, 1, 2)))
  seen = {}

  def layer_fn(xs, sc, mods, member, mask):
    seen['T'] = xs.shape[1]
    return jnp.tanh(xs) * 3.0, {}

  out, aux = m(layer_fn, x, sin_cos, modality)
  assert seen['T'] == 8 and float(aux['mod/selected_fraction']) == 0.25
  g = jax.nn.sigmoid(jnp.einsum('BTD,DO->BT', x, m.router[...]))
  changed = np.asarray(jnp.any(out != x, axis=-1))
  for b in range(3):
    top = np.sort(np.argsort(-np.asarray(g[b]), kind='stable')[:8])
    np.testing.assert_array_equal(np.flatnonzero(changed[b]), top)
    skipped = np.setdiff1d(np.arange(32), top)
    np.testing.assert_array_equal(np.asarray(out[b, skipped]), np.asarray(x[b, skipped]))
    ref = x[b, top] + g[b, top][:, None] * (jnp.tanh(x[b, top]) * 3.0 - x[b, top])
    np.testing.assert_allclose(np.asarray(out[b, top]), np.asarray(ref), rtol=1e-6)


def _decoder_and_batch(arg, seed=0):
  c = moma_tiny(arg)
  model = state_lib.make_model(c, seed)
  batch = {k: jnp.asarray(v) for k, v in random_batch(2, c.seq_len, seed=3).items()}
  return model, batch


@pytest.mark.parametrize('arg', ['tiny,mod=1', 'tiny,groups=7t1i'])
def test_aux_routing_is_causal_and_batch_routing_is_not(arg):
  model, batch = _decoder_and_batch(arg)
  t = 12
  changed = dict(batch)
  rng = np.random.default_rng(7)
  tokens = np.asarray(batch['tokens']).copy()
  tokens[:, t + 1:] = rng.permutation(tokens[:, t + 1:], axis=1)[:, ::-1]
  changed['tokens'] = jnp.asarray(tokens)
  from data import tokenizer
  changed['modality'] = jnp.asarray(tokenizer.modality_of(tokens).astype(np.int32))
  graphdef, params = nnx.split(model)
  run = jax.jit(lambda p, b, causal: nnx.merge(graphdef, p)(b, causal=causal)[0],
                static_argnums=2)
  causal_a, causal_b = run(params, batch, True), run(params, changed, True)
  np.testing.assert_allclose(np.asarray(causal_a[:, :t + 1]), np.asarray(causal_b[:, :t + 1]),
                             rtol=1e-5, atol=1e-5)
  batch_a, batch_b = run(params, batch, False), run(params, changed, False)
  # expert choice (and MoD top-k) over the whole sequence: earlier outputs see the future
  assert float(jnp.max(jnp.abs(batch_a[:, :t + 1] - batch_b[:, :t + 1]))) > 1e-3


def test_aux_stage_trains_only_the_aux_routers():
  c = moma_tiny('tiny,mod=1,stage=aux', **{'mesh.data': 1})
  mesh = partitioning.make_mesh(c.mesh, devices=jax.devices()[:1])
  layout = state_lib.state_layout(c, mesh)
  state = state_lib.init_state(c, layout)
  batch = {k: jnp.asarray(v) for k, v in random_batch(c.batch_size, c.seq_len).items()}
  step = jax.jit(lambda s, b: step_lib.train_step(
      s, b, graphdef=layout.graphdef, tx=layout.tx, num_modalities=2, stage='aux'))
  with jax.set_mesh(mesh):
    new, metrics = step(step(state, batch)[0], batch)  # the first step's LR is 0 (warmup)
  old_p, new_p = nnx.to_pure_dict(state['params']), nnx.to_pure_dict(new['params'])
  flat_old = jax.tree_util.tree_flatten_with_path(old_p)[0]
  flat_new = jax.tree.leaves(new_p)
  moved = {jax.tree_util.keystr(p): not np.array_equal(a, b)
           for (p, a), b in zip(flat_old, flat_new)}
  aux_keys = [k for k in moved if 'aux_router' in k]
  assert aux_keys and all(moved[k] for k in aux_keys)
  assert not any(v for k, v in moved.items() if 'aux_router' not in k)
  assert float(metrics['loss']) > 0  # the BCE of the aux routers


SHARDED_OVERRIDES = {'model.moma.mlp_dim': 32, 'batch_size': 8}


@functools.cache
def _unsharded_loss_and_grads():
  """The one-device reference, computed once for both meshes it is compared on."""
  return loss_and_grads(moma_tiny('tiny,mod=1', **SHARDED_OVERRIDES, **{'mesh.data': 1}),
                        jax.devices()[:1])


@pytest.mark.parametrize('shape', [(2, 1, 4, 1), (1, 2, 2, 2)])  # data x expert; + fsdp, tensor
def test_sharded_equals_unsharded(shape):
  ref_loss, ref_grads, _ = _unsharded_loss_and_grads()
  loss, grads, _ = loss_and_grads(
      moma_tiny('tiny,mod=1', **SHARDED_OVERRIDES,
                **{f'mesh.{a}': s for a, s in zip(partitioning.MESH_AXES, shape)}),
      jax.devices())
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               grads, ref_grads)


@pytest.mark.parametrize('arg, overrides, message', [
    ('tiny,groups=4t', {}, "gives no experts to ['image']"),
    ('tiny,groups=4x4i', {}, 'names no modality'),
    ('tiny,groups=4t4t', {}, "'text' twice"),
    ('tiny', {'model.moma.capacity': '1.5'}, 'must be in (0, 1]'),
    ('tiny', {'model.moma.router': 'bogus'}, 'not one of'),
    ('tiny,groups=3t2i', {'mesh.data': 2, 'mesh.expert': 4}, 'not divisible by mesh.expert=4'),
    ('tiny,groups=1t1i,stage=aux', {}, 'has none'),
    ('tiny,mod=1', {'model.moma.mod.capacity': 0.0}, 'mod.capacity must be in (0, 1]'),
    ('tiny', {'model.moma.group_sequences': 3}, 'group_sequences=3'),
])
def test_bad_moma_config_gives_one_clear_error(arg, overrides, message):
  from training.validate import validate
  c = moma_config.get_config(arg)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(ValueError, match=None) as e:
    validate(c, 8)
  assert message in str(e.value)


@pytest.mark.parametrize('groups, router, shared', [
    ((('text', 4), ('image', 4)), 'expert_choice', 0),
    ((('text', 7), ('image', 1)), 'expert_choice', 0),
    ((('text', 1), ('image', 1)), 'expert_choice', 2),
    ((('text', 3), ('image', 2)), 'topk', 0)])
@pytest.mark.parametrize('p_image', [0.0, 0.3, 1.0])
def test_valid_pair_bound_holds_so_the_dropless_truncation_loses_nothing(groups, router,
                                                                          shared, p_image):
  layer = ffn(groups=groups, router=router, shared=shared)
  x, modality = inputs(B=3, T=30, p_image=p_image)
  logits = jnp.einsum('BTD,DE->BTE', x, layer.router[...])
  for causal in (False, True):
    aux = ({i: jnp.full(logits.shape[:2] + (layer.spec.groups[i].experts,), 1.0)
            for i in layer.spec.aux_groups()} if causal else None)  # every aux router fires
    route, _ = moma.route(layer.spec, logits, modality, jnp.ones((3, 30), bool), aux)
    bound = route.max_valid
    assert int(jnp.max(jnp.sum(route.valid, axis=1))) <= bound <= route.valid.shape[1]
  y_full, _ = dispatch.dropless_dispatch_combine(x, route, layer.experts)
  y_cut, _ = dispatch.dropless_dispatch_combine(x, route, layer.experts, max_valid=bound)
  np.testing.assert_array_equal(np.asarray(y_cut), np.asarray(y_full))


def test_greedy_generation_with_aux_routing_matches_teacher_forcing():
  from models import generate
  model, batch = _decoder_and_batch('tiny,mod=1')
  graphdef, params = nnx.split(model)
  prompt = batch['tokens'][:, :10]
  out = generate.recompute_greedy(graphdef, params, prompt, 6, causal=True)
  assert out.shape == (2, 16) and np.array_equal(np.asarray(out[:, :10]), np.asarray(prompt))
  # Causal routing: the logits of the finished sequence reproduce every generated token.
  logits, _ = model({'tokens': out, 'modality': generate.modality_of(out)}, causal=True)
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 9:15], -1)),
                                np.asarray(out[:, 10:]))
