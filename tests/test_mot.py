"""Mixture-of-Transformers (models/mot.py): equal weights give the dense model, modality
isolation of gradients, ablation subsets, MoT + MoE, sharded == unsharded."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dense, mot as mot_config
from core import partitioning
from data import tokenizer
from models import mot
from tests.helpers import loss_and_grads, random_batch, tiny_config
from training import state as state_lib, step as step_lib


def mot_tiny(arg='tiny', **overrides):
  c = tiny_config(base=mot_config.get_config(arg), **overrides)
  c.model.mot.moe.mlp_dim = 64
  return c


def batch_of(c, seed=3, **kw):
  return {k: jnp.asarray(v) for k, v in random_batch(c.batch_size, c.seq_len, seed=seed,
                                                     **kw).items()}


def untied_params(model) -> set[str]:
  """Paths of the parameters with a leading 'modality' axis."""
  out = set()
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if getattr(v, 'out_sharding', None) and v.out_sharding[0] == 'modality':
      out.add('/'.join(str(p) for p in path))
  return out


def _dense_into_mot(dense_params, mot_model, M=2):
  """Copy a dense Decoder's weights into every modality slice of an all-untied MoT."""
  d = nnx.to_pure_dict(dense_params)
  m = nnx.to_pure_dict(nnx.state(mot_model, nnx.Param))
  tile = lambda a: jnp.asarray(np.broadcast_to(np.asarray(a), (M,) + np.shape(a)))
  for key in ('embed', 'final_norm', 'lm_head'):
    m[key] = d[key]
  for i, blk in d['blocks'].items():
    mb = m['blocks'][i]
    for w in ('wq', 'wk', 'wv', 'wo'):
      mb[w] = tile(blk['attn'][w])
    mb['attn_norm']['scale'] = tile(blk['attn_norm']['scale'])
    mb['ffn_norm']['scale'] = tile(blk['ffn_norm']['scale'])
    for w in ('w_gate', 'w_up', 'w_down'):
      mb[w] = tile(blk['ffn'][w])
  nnx.replace_by_pure_dict(state := nnx.state(mot_model, nnx.Param), m)
  nnx.update(mot_model, state)


@pytest.mark.parametrize('seed', [0, 1])
def test_equal_weights_compute_exactly_the_dense_model(seed):
  dc = tiny_config()
  dense_model = state_lib.make_model(dc, 0)
  mc = mot_tiny('tiny,norm=pre')  # the dense Block is pre-norm
  mot_model = state_lib.make_model(mc, 1)
  _dense_into_mot(nnx.state(dense_model, nnx.Param), mot_model)
  batch = batch_of(dc, seed=seed + 10)  # random modality patterns with padding
  ref, _ = dense_model(batch)
  out, _ = mot_model(batch)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_res_post_mot_with_tied_weights_equals_all_untied_with_equal_slices():
  tied = state_lib.make_model(mot_tiny('tiny,untie=none'), 0)
  untied = state_lib.make_model(mot_tiny('tiny'), 1)
  t = nnx.to_pure_dict(nnx.state(tied, nnx.Param))
  u = nnx.to_pure_dict(nnx.state(untied, nnx.Param))
  u = jax.tree.map(lambda a, b: jnp.broadcast_to(a, b.shape), t, u)
  state = nnx.state(untied, nnx.Param)
  nnx.replace_by_pure_dict(state, u)
  nnx.update(untied, state)
  batch = batch_of(mot_tiny('tiny'))
  np.testing.assert_allclose(np.asarray(untied(batch)[0]), np.asarray(tied(batch)[0]),
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('arg', ['tiny', 'tiny,qk_norm=1,norm=pre', 'tiny,untie=ffn,attn'])
def test_a_modality_absent_from_the_batch_gets_exactly_zero_gradients(arg):
  c = mot_tiny(arg, **{'mesh.data': 1})
  model = state_lib.make_model(c, 0)
  graphdef, params = nnx.split(model)
  batch = batch_of(c)
  text_only = dict(batch)
  tokens = np.where(np.asarray(batch['modality']) == 1, tokenizer.TEXT_OFFSET + 5,
                    np.asarray(batch['tokens']))
  text_only['tokens'] = jnp.asarray(tokens)
  text_only['modality'] = jnp.zeros_like(batch['modality'])
  grads = jax.jit(jax.grad(lambda p: step_lib.loss_fn(p, graphdef, text_only, 2)[0]))(params)
  untied = untied_params(model)
  assert untied
  for path, g in nnx.to_flat_state(grads):
    name = '/'.join(str(p) for p in path)
    if name in untied:
      g = np.asarray(g[...])
      assert np.all(g[1] == 0), name  # image slice: exactly zero
      assert np.any(g[0] != 0), name


def test_every_grouped_kernel_gives_the_same_model():
  """The MoT decoder with 'batched' (GPU), 'ragged_dot' (TPU) and 'tokamax' (XLA's fallback
  here) kernels computes the logits and gradients of the CPU default ('blocks', as chunks)."""
  import dataclasses
  from models import transformer
  c = mot_tiny('tiny,qk_norm=1')
  spec = state_lib.model_spec(c)
  params = nnx.state(transformer.Decoder(spec, rngs=nnx.Rngs(0)), nnx.Param)
  batch = batch_of(c)
  results = []
  for impl in ('blocks', 'batched', 'ragged_dot', 'tokamax'):
    model = transformer.Decoder(dataclasses.replace(
        spec, mot=dataclasses.replace(spec.mot, grouped_impl=impl)), rngs=nnx.Rngs(1))
    nnx.update(model, params)
    graphdef, p = nnx.split(model)
    loss = lambda p: jnp.mean(jnp.sin(nnx.merge(graphdef, p)(batch)[0]))  # noqa: E731
    results.append(jax.value_and_grad(loss)(p))
  for other in results[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 other, results[0])


@pytest.mark.parametrize('untie, expected', [
    ('ffn', {'w_gate', 'w_up', 'w_down'}),
    ('ffn,attn', {'w_gate', 'w_up', 'w_down', 'wq', 'wk', 'wv', 'wo'}),
    ('all', {'w_gate', 'w_up', 'w_down', 'wq', 'wk', 'wv', 'wo', 'attn_norm/scale',
             'ffn_norm/scale'}),
    ('none', set())])
def test_each_ablation_unties_exactly_what_it_names(untie, expected):
  model = state_lib.make_model(mot_tiny(f'tiny,untie={untie}'), 0)
  for i in range(2):
    got = {p.removeprefix(f'blocks/{i}/') for p in untied_params(model)
           if p.startswith(f'blocks/{i}/')}
    assert got == expected
  assert not any(p.split('/')[0] in ('embed', 'final_norm', 'lm_head')
                 for p in untied_params(model))


def test_text_moe_routes_only_text_tokens():
  c = mot_tiny('tiny,moe=text', **{'mesh.data': 1})
  model = state_lib.make_model(c, 0)
  graphdef, params = nnx.split(model)
  batch = batch_of(c)
  image_only = dict(batch)
  image_only['tokens'] = jnp.full_like(batch['tokens'], tokenizer.IMAGE_OFFSET + 3)
  image_only['modality'] = jnp.ones_like(batch['modality'])
  grads = nnx.to_pure_dict(jax.jit(jax.grad(
      lambda p: step_lib.loss_fn(p, graphdef, image_only, 2)[0]))(params))
  for blk in grads['blocks'].values():
    for w in ('w_gate', 'w_up', 'w_down'):
      assert np.all(np.asarray(blk['moe']['experts'][w]) == 0)
    assert np.any(np.asarray(blk['w_gate']) != 0)  # the image FFN ([1, D, F]: image only)
    assert np.asarray(blk['w_gate']).shape[0] == 1
  _, aux = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b))(params, batch)
  assert 'layer_0/expert_load' in aux and aux['layer_0/expert_load'].shape == (4,)


@functools.cache
def _unsharded_loss_and_grads(arg):
  """The one-device reference of `arg`, computed once for all the meshes it is compared on."""
  return loss_and_grads(mot_tiny(arg, **{'mesh.data': 1}), jax.devices()[:1])


@pytest.mark.parametrize('arg, shape', [
    ('tiny,qk_norm=1', (2, 2, 1, 2)), ('tiny,qk_norm=1', (1, 2, 1, 4)),
    ('tiny,untie=ffn,attn,moe=text', (2, 1, 2, 2))])
def test_sharded_equals_unsharded(arg, shape):
  ref_loss, ref_grads, _ = _unsharded_loss_and_grads(arg)
  loss, grads, _ = loss_and_grads(
      mot_tiny(arg, **{f'mesh.{a}': s for a, s in zip(partitioning.MESH_AXES, shape)}),
      jax.devices())
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               grads, ref_grads)


@pytest.mark.parametrize('arg, message', [
    ('tiny,untie=ffn,bogus', "names ['bogus']"),
    ('tiny,moe=audio', "moe_modality='audio' is not one of"),
    ('tiny,norm=post', "norm='post' is not one of"),
])
def test_bad_mot_config_gives_one_clear_error(arg, message):
  from training.validate import validate
  with pytest.raises(ValueError) as e:
    validate(mot_config.get_config(arg), 8)
  assert message in str(e.value)


@pytest.mark.parametrize('impl,E', [('blocks', 3), ('blocks', 10), ('ragged_dot', 3),
                                     ('tokamax', 3), ('batched', 3)])
def test_grouped_rows_kernels_equal_a_per_row_reference(impl, E):
  """'blocks' with 3 groups runs as chunks, with 10 (> CHUNK_MAX_GROUPS) as the block loop."""
  from moe import grouped
  rng = np.random.default_rng(0)
  N, K, F = 300, 8, 12
  x = jnp.asarray(rng.normal(size=(N, K)), jnp.float32)
  group = jnp.asarray(rng.integers(0, E + 1, N), jnp.int32)  # E = no group
  w = jnp.asarray(0.3 * rng.normal(size=(E, K, F)), jnp.float32)
  wg, wu = (jnp.asarray(0.3 * rng.normal(size=(E, K, F)), jnp.float32) for _ in range(2))
  wd = jnp.asarray(0.3 * rng.normal(size=(E, F, K)), jnp.float32)

  # Per-row references: row r times its own group's weights (gathered per row; group E,
  # no group, gets zero weights).
  row_w = lambda w: jnp.concatenate([w, jnp.zeros_like(w[:1])])[group]  # noqa: E731

  def ref_matmul(x, w):
    return jnp.einsum('nk,nkf->nf', x, row_w(w))

  def ref_swiglu(x, wg, wu, wd):
    h = jax.nn.silu(jnp.einsum('nk,nkf->nf', x, row_w(wg))) * jnp.einsum(
        'nk,nkf->nf', x, row_w(wu))
    return jnp.einsum('nf,nfk->nk', h, row_w(wd))

  # block 32: each of 3 groups spans 2-3 blocks, so chunks of several sizes are taken
  mm = lambda x, w: grouped.grouped_matmul_rows(x, w, group, impl=impl, block=32)
  sw = lambda x, *w: grouped.grouped_swiglu_rows(x, *w, group, impl=impl, block=32)
  for fn, ref, args in ((mm, ref_matmul, (x, w)), (sw, ref_swiglu, (x, wg, wu, wd))):
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(*args)), np.asarray(ref(*args)),
                               rtol=1e-5, atol=1e-5)
    loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a))))
    argnums = tuple(range(len(args)))
    got = jax.jit(jax.grad(loss(fn), argnums))(*args)
    want = jax.grad(loss(ref), argnums)(*args)
    for g, r in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_config_key_grouped_impl_reaches_every_grouped_kernel():
  """`model.grouped_impl` sets the kernel of MoT's projections and of its MoE modality (and
  of the MoE family's dropless experts); an unknown name is refused before compilation."""
  from configs import moe as moe_config
  from training.validate import validate
  c = mot_tiny('tiny,moe=image')
  c.model.grouped_impl = 'tokamax'
  spec = state_lib.model_spec(c)
  assert spec.mot.grouped_impl == spec.mot.moe.grouped_impl == 'tokamax'
  model = mot.MoTBlock(spec, rngs=nnx.Rngs(0))
  assert model.moe.experts.grouped_impl == 'tokamax'
  m = moe_config.get_config('tiny,dispatch=dropless')
  m.model.grouped_impl = 'batched'
  assert state_lib.model_spec(m).moe.grouped_impl == 'batched'
  m.model.grouped_impl = 'cutlass'
  with pytest.raises(ValueError, match=r"model.grouped_impl='cutlass' is not one of"):
    validate(m, 8)
