"""IMP model (projects/imp/model.py): multi-resolution embedders, the losses against numpy, the
prefix-LM mask, gradients reaching only a task's own modules, MoE in the last layers."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from core import partitioning
from data import tokenizer
from projects.imp import losses as imp_losses
from projects.imp import model as imp
from moe import layer as moe_layer, routing

SPEC = imp.IMPSpec(embed_dim=16, num_layers=2, num_heads=2, head_dim=8, mlp_dim=32,
                   classifiers=(('shapes', 6),), patch_size=4, max_text_len=16,
                   proj_dim=8)
MOE = moe_layer.MoESpec(
    num_experts=4, mlp_dim=16, dispatch='capacity',
    router=routing.RouterConfig(name='expert_choice', capacity_factor=1.0,
                                load_balance_coef=0.0, z_loss_coef=1e-3))


def _images(b, size, seed=0):
  rng = np.random.default_rng(seed)
  return imp.normalize_images(rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8))


def _text(b, t, lengths, seed=0):
  tokens = np.random.default_rng(seed).integers(tokenizer.TEXT_OFFSET,
                                                tokenizer.TEXT_OFFSET + 256, (b, t))
  mask = np.arange(t)[None] < np.asarray(lengths)[:, None]
  return jnp.asarray(np.where(mask, tokens, tokenizer.PAD), jnp.int32), jnp.asarray(mask)


def _batches():
  text, text_mask = _text(2, 8, [5, 8])
  return {
      'classify': {'image': _images(2, 16), 'label': jnp.array([1, 4])},
      'contrastive': {'image': _images(2, 16), 'text': text, 'text_mask': text_mask},
      'caption': {'image': _images(2, 16), **imp_losses.caption_inputs(text)},
  }


def test_two_resolutions_share_weights_and_sincos_positions():
  model = imp.IMPModel(SPEC, rngs=nnx.Rngs(0))
  encode = nnx.jit(lambda m, x: m.encode_image(x))
  for size, n in ((32, 64), (16, 16)):
    y, aux = encode(model, _images(2, size))
    assert y.shape == (2, n, 16) and aux == {} and np.isfinite(y).all()
  # Zero image: patch kernel contributes 0, bias is 0 at init -> exactly the position table.
  embed = nnx.jit(lambda m, x: m.image_embed(x))
  pe32 = np.asarray(embed(model, jnp.zeros((1, 32, 32, 3))))[0]
  pe16 = np.asarray(embed(model, jnp.zeros((1, 16, 16, 3))))[0]
  w = lambda i: 10_000.0 ** (-i / 3)  # D/4 = 4 frequencies
  # Patch 9 of the 8x8 grid is (row 1, col 1); blocks [sin x, cos x, sin y, cos y].
  np.testing.assert_allclose(pe32[9, 0], math.sin(1.0), rtol=1e-6)
  np.testing.assert_allclose(pe32[9, 4 + 1], math.cos(w(1)), rtol=1e-6)
  # Patch 10 = (row 1, col 2).
  np.testing.assert_allclose(pe32[10, 2], math.sin(2 * w(2)), rtol=1e-6)
  np.testing.assert_allclose(pe32[10, 8 + 2], math.sin(w(2)), rtol=1e-6)
  np.testing.assert_allclose(pe32[10, 12 + 3], math.cos(w(3)), rtol=1e-6)
  # Patch-index coordinates: patch 5 of the 4x4 grid is (1, 1) as well.
  np.testing.assert_array_equal(pe16[5], pe32[9])
  # posemb_grid=8 rescales the 4x4 grid to centres 0.5, 2.5, 4.5, 6.5 of an 8x8 layout.
  pe = imp.posemb_sincos_2d(4, 4, 16, grid=8)
  np.testing.assert_allclose(pe[1 * 4 + 3, 0], math.sin(6.5), rtol=1e-6)
  np.testing.assert_allclose(pe[1 * 4 + 3, 8], math.sin(2.5), rtol=1e-6)
  np.testing.assert_array_equal(imp.posemb_sincos_2d(8, 8, 16, grid=8), pe32)


def test_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(0)
  norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  img = norm(rng.normal(size=(5, 8)))
  txt = norm(img + 0.8 * rng.normal(size=(5, 8)))
  txt[[1, 3]] = txt[[3, 1]]  # two swapped pairs: recall@1 < 1
  log_temp = math.log(4.0)
  logits = np.exp(log_temp) * img @ txt.T

  def ce(l):  # mean over rows, label = row index
    l = l - l.max(axis=1, keepdims=True)
    return np.mean(np.log(np.exp(l).sum(axis=1)) - np.diag(l))
  want = 0.5 * (ce(logits) + ce(logits.T))
  loss, metrics = imp_losses.contrastive_loss(jnp.asarray(img, jnp.float32),
                                       jnp.asarray(txt, jnp.float32), log_temp)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  labels = np.arange(5)
  i2t = np.mean(logits.argmax(axis=1) == labels)
  t2i = np.mean(logits.argmax(axis=0) == labels)
  assert i2t < 1
  np.testing.assert_allclose(metrics['i2t_recall_at_1'], i2t)
  np.testing.assert_allclose(metrics['t2i_recall_at_1'], t2i)
  np.testing.assert_allclose(metrics['logit_scale'], 4.0, rtol=1e-6)


def test_classification_and_caption_losses_match_numpy():
  logits = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
  loss, m = imp_losses.classification_loss(jnp.asarray(logits), jnp.array([0, 1]))
  lse = np.log(np.exp(logits).sum(1))
  np.testing.assert_allclose(loss, np.mean(lse - logits[[0, 1], [0, 1]]), rtol=1e-6)
  assert m['accuracy'] == 0.5
  loss, m = imp_losses.caption_loss(jnp.asarray(logits[None]), jnp.array([[0, 2]]),
                             jnp.array([[False, True]]))
  np.testing.assert_allclose(loss, lse[1] - 3.0, rtol=1e-6)
  assert m['token_accuracy'] == 1.0 and m['num_tokens'] == 1.0


def test_caption_prefix_lm_is_causal_on_text_and_sees_the_image():
  model = imp.IMPModel(SPEC, rngs=nnx.Rngs(1))
  fn = nnx.jit(lambda m, i, t: m.caption_logits(i, t)[0])
  images, (text, _) = _images(2, 16), _text(2, 8, [8, 8])
  base = np.asarray(fn(model, images, text))
  assert base.shape == (2, 8, SPEC.vocab_size)
  t = 3
  changed = np.asarray(fn(model, images, text.at[:, t + 1].set(tokenizer.TEXT_OFFSET + 7)))
  np.testing.assert_array_equal(changed[:, :t + 1], base[:, :t + 1])
  assert (np.abs(changed[:, t + 1:] - base[:, t + 1:]).max(axis=-1) > 1e-6).all()
  pixel = np.asarray(fn(model, images.at[:, 5, 7, 0].add(1.0), text))
  assert (np.abs(pixel - base).max(axis=-1) > 1e-6).all()  # every text position


def _grads(model, kind, batch):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p):
    return imp_losses.task_loss(nnx.merge(graphdef, p, rest), kind, batch)[0]
  return jax.jit(jax.grad(loss_fn))(params)


@pytest.mark.parametrize('kind', sorted(imp_losses.TASKS))
def test_task_loss_reaches_only_its_modules(kind):
  model = imp.IMPModel(SPEC, rngs=nnx.Rngs(2))
  grads = _grads(model, kind, _batches()[kind])
  norms = {}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    top = path[0].key
    norms[top] = norms.get(top, 0.0) + float(jnp.sum(jnp.abs(g)))
  assert set(norms) == {'image_embed', 'text_embed', 'encoder', 'classifiers', 'image_proj',
                        'text_proj', 'log_temp', 'caption_head'}
  reached = {k for k, v in norms.items() if v > 0}
  assert reached == set(imp_losses.TASK_MODULES[kind]), norms


def test_moe_in_last_layer_only():
  spec = dataclasses.replace(SPEC, moe=MOE, moe_last=1)
  model = imp.IMPModel(spec, rngs=nnx.Rngs(3))
  paths = [p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  expert_paths = [p for p in paths if 'experts' in p]
  assert expert_paths and all(p[:3] == ('encoder', 'blocks', 1) for p in expert_paths)
  w = model.encoder.blocks[1].ffn.experts.w_gate
  assert w.shape[0] == 4 and w.get_metadata()['out_sharding'][0] == 'expert'
  step = nnx.jit(imp_losses.task_loss, static_argnums=1)
  for kind, batch in _batches().items():
    loss, metrics = step(model, kind, batch, jax.random.key(0))
    assert np.isfinite(loss), kind
    aux = [k for k in metrics if k.startswith('moe/') and k.endswith('/aux_loss')]
    assert aux and all('layer_1/' in k for k in aux), metrics.keys()
    assert 0 < metrics['moe_aux_loss'] < 0.1, metrics  # z-loss of the padded text too
    np.testing.assert_allclose(loss, metrics['task_loss'] + metrics['moe_aux_loss'],
                               rtol=1e-6)


def test_moe_routes_no_padding():
  """What the pad positions hold changes neither the valid tokens' outputs nor the router
  metrics: pads take no expert slot (MoELayer token_mask) and the z-loss skips them."""
  spec = dataclasses.replace(SPEC, moe=MOE, moe_last=2)
  model = imp.IMPModel(spec, rngs=nnx.Rngs(4))
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 200, (4, 16)).astype(np.int32)
  mask = np.arange(16)[None] < np.array([[16], [9], [5], [12]])
  other = np.where(mask, tokens, rng.integers(3, 200, tokens.shape)).astype(np.int32)
  encode = nnx.jit(lambda m, t: m.encode_text(t, jnp.asarray(mask)))
  (a, aux_a), (b, aux_b) = encode(model, tokens), encode(model, other)
  np.testing.assert_allclose(np.asarray(a)[mask], np.asarray(b)[mask], rtol=1e-5, atol=1e-6)
  for key in aux_a:
    np.testing.assert_allclose(aux_a[key], aux_b[key], rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.parametrize('overrides, message', [
    ({'embed_dim': 30}, 'multiple of 4'),
    ({'num_heads': 0}, 'num_heads must be an int >= 1'),
    ({'moe_last': 1}, 'needs IMPSpec.moe'),
    ({'moe': MOE, 'moe_last': 3}, 'moe_last=3 must be in [0, num_layers=2]'),
    ({'moe': moe_layer.MoESpec(num_experts=4, mlp_dim=16, router=MOE.router), 'moe_last': 1},
     'expert-choice routing has a capacity'),
    ({'dtype': 'float8'}, 'unknown dtype'),
])
def test_check_spec_rejects_bad_specs(overrides, message):
  spec = dataclasses.replace(SPEC, **overrides)
  with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')):
    imp.check_spec(spec)


def test_task_loss_rejects_unknown_kind_and_missing_keys():
  model = imp.IMPModel(SPEC, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown IMP task kind 'vqa'"):
    imp_losses.task_loss(model, 'vqa', {})
  with pytest.raises(ValueError, match=r"batch lacks \['text_mask'\]"):
    imp_losses.task_loss(model, 'contrastive', {'image': _images(1, 16), 'text': jnp.ones((1, 4))})


def test_every_parameter_has_a_sharding_rule():
  spec = dataclasses.replace(SPEC, moe=MOE, moe_last=1)
  abstract = nnx.eval_shape(lambda: imp.IMPModel(spec, rngs=nnx.Rngs(0)))
  mesh = jax.make_mesh((2, 1, 2, 2), partitioning.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  specs = dict(nnx.to_flat_state(partitioning.tree_shardings(nnx.state(abstract, nnx.Param),
                                                         mesh)))
  specs = {k: v.get_value().spec for k, v in specs.items()}
  assert specs[('caption_head', 'kernel')] == P('fsdp', 'tensor')
  assert specs[('text_embed', 'embed', 'table')] == P('tensor', 'fsdp')
  assert specs[('encoder', 'blocks', 0, 'attn', 'wq')] == P('fsdp', 'tensor', None)
  assert specs[('encoder', 'blocks', 1, 'ffn', 'experts', 'w_gate')][0] == 'expert'
  assert specs[('log_temp',)] == P()


@pytest.mark.parametrize('moe', ['0', '1'])
def test_spec_from_config(moe):
  from configs import imp as imp_config
  c = imp_config.get_config(f'tiny,moe={moe}')
  spec = imp.spec_from_config(c.model, param_dtype=c.param_dtype,
                              compute_dtype=c.compute_dtype)
  imp.check_spec(spec)
  assert spec.moe_last == int(moe) and (spec.moe is None) == (moe == '0')
  if spec.moe is not None:
    assert spec.moe.router.expert_choice and spec.moe.dispatch == 'capacity'
