"""Fine-grained upcycling (models/upcycle.py, MoE targets; docs/pyramid_upcycle.md): a dense
FFN cut into g slices, each cloned into E/g experts, zero routers and top-k (k a multiple of
g) routing: the upcycled model computes the dense model's logits at step 0, the clones'
co-firing is logged, and bad configs fail with one clear error before anything compiles."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from configs import moe as moe_configs
from core import partitioning
from models import upcycle
from moe import layer as moe_layer, routing
from tests.helpers import random_batch, tiny_config
from training import checkpoint, loop, metrics, state as state_lib, warm_start
from training.validate import validate

WIDTH = 128  # tiny_config's model.mlp_dim: the dense FFN the slices come from


def _moe(arg, **overrides):
  """configs/moe.py `arg` on tiny_config's shapes (experts 1/g of the dense width)."""
  config = moe_configs.get_config(f'tiny,{arg}')
  g = config.model.moe.slices
  return tiny_config(config, **{'model.moe.mlp_dim': WIDTH // (g or 1), **overrides})


def _params(config, seed, noise=False):
  """Pure-dict params of a fresh model; `noise` makes every leaf distinct (norm scales are
  all ones at init)."""
  params = nnx.to_pure_dict(nnx.split(state_lib.make_model(config, seed))[1])
  if noise:
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    params = tree.unflatten([x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                             for x, k in zip(leaves, keys)])
  return jax.device_get(params)


def _logits_and_aux(config, pure, batch, rng=None):
  graphdef, state = nnx.split(state_lib.make_model(config, 0))
  nnx.replace_by_pure_dict(state, pure)
  return jax.jit(lambda s, b, r: nnx.merge(graphdef, s)(b, r))(state, batch, rng)


def _upcycled(new_cfg, src_cfg, src):
  spec = state_lib.model_spec
  return jax.device_get(jax.jit(
      lambda s, n: upcycle.upcycle(spec(src_cfg), s, spec(new_cfg), n))(src,
                                                                         _params(new_cfg, 1)))


@functools.cache
def _dense_source():
  """tiny_config's dense model with distinct (noised) params, a batch and the model's
  logits on it: the source of every upcycling case below, made once (read-only)."""
  src = _params(tiny_config(), 0, noise=True)
  batch = random_batch(4, 32)
  want, _ = _logits_and_aux(tiny_config(), src, batch)
  return src, batch, jax.device_get(want)


def test_experts_are_the_slices_of_the_dense_ffn():
  src_cfg, new_cfg = tiny_config(), _moe('slices=4,experts=8,every=1')
  src, _, _ = _dense_source()
  out = _upcycled(new_cfg, src_cfg, src)
  f = WIDTH // 4
  for i in range(2):
    s, o = src['blocks'][i], out['blocks'][i]
    for key in ('attn', 'attn_norm', 'ffn_norm'):
      jax.tree.map(np.testing.assert_array_equal, o[key], s[key])
    experts = o['ffn']['experts']
    for e in range(8):
      cols = slice((e % 4) * f, (e % 4 + 1) * f)
      np.testing.assert_array_equal(experts['w_gate'][e], s['ffn']['w_gate'][:, cols])
      np.testing.assert_array_equal(experts['w_up'][e], s['ffn']['w_up'][:, cols])
      np.testing.assert_array_equal(experts['w_down'][e], s['ffn']['w_down'][cols])
    assert not np.any(o['ffn']['router'])
  for key in ('embed', 'final_norm', 'lm_head'):
    jax.tree.map(np.testing.assert_array_equal, out[key], src[key])


@pytest.mark.parametrize('arg, cofire', [
    ('slices=4,experts=8', 0.0),  # k = g: one clone of every slice
    ('slices=4,experts=16,k=8', 1.0),  # k = 2g: every slice twice
    ('slices=2,experts=4,4,every=1,residual=1', 0.0),  # a pyramid + PR-MoE residual MLP
    ('slices=2,experts=2,4,every=1,router=topk_sigmoid', 0.0),
    ('slices=1,experts=4,every=1,k=2', 1.0),  # plain sparse upcycling: copies, top-2
])
def test_upcycled_model_computes_the_dense_model_at_step_0(arg, cofire):
  src_cfg, new_cfg = tiny_config(), _moe(arg, **{'model.moe.jitter': 0.1})
  src, batch, want = _dense_source()
  new = _upcycled(new_cfg, src_cfg, src)
  # Router jitter only scales the (zero-weighted) router input: still the same function.
  got, aux = _logits_and_aux(new_cfg, new, batch, jax.random.key(3))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  moe_layers = [k for k in aux if k.endswith('clone_cofire')]
  assert moe_layers
  for key in moe_layers:
    assert float(aux[key]) == cofire, key
    assert float(aux[key.replace('clone_cofire', 'slice_coverage')]) == 1.0


def test_clone_metrics_by_hand():
  # 2 tokens, k = 2, E = 4 experts, g = 2 slices (expert e is a clone of e % 2): token 0
  # takes experts 0 and 2 (both slice 0: co-firing, half the slices), token 1 takes 1, 2.
  route = routing.Routing(
      token=np.array([[0, 0, 1, 1]], np.int32), expert=np.array([[0, 2, 1, 2]], np.int32),
      weight=np.ones((1, 4), np.float32), valid=np.ones((1, 4), bool), num_experts=4,
      group_size=2)
  m = jax.device_get(moe_layer.clone_metrics(route, 2))
  assert float(m['clone_cofire']) == 0.5 and float(m['slice_coverage']) == 0.75
  m = jax.device_get(moe_layer.clone_metrics(route.replace(valid=np.array([[1, 0, 1, 1]],
                                                                           bool)), 2))
  assert float(m['clone_cofire']) == 0.0 and float(m['slice_coverage']) == 0.75


BAD_CONFIGS = [  # (config arg, overrides, words of the one error)
    ('slices=4,experts=6', {}, 'num_experts=6 is not a multiple of model.moe.slices=4'),
    ('slices=2,experts=2,3,every=1', {}, 'expert counts [3] are not multiples of '
                                         'model.moe.slices=2'),
    ('slices=4', {'model.moe.mlp_dim': 64}, 'model.moe.mlp_dim=64 must be model.mlp_dim / '
                                            'model.moe.slices = 128 / 4 = 32'),
    ('slices=4', {'model.moe.slices': 3}, 'slices=3 does not divide the dense FFN width '
                                            'model.mlp_dim=128'),
    ('slices=4,upcycle_from=/x', {'model.moe.k': 6}, 'k=6 must be a multiple of '
                                                     'model.moe.slices=4'),
    ('slices=4,upcycle_from=/x', {'model.moe.renormalize': False}, 'renormalize must be True'),
    ('slices=4,upcycle_from=/x,dispatch=capacity', {}, "dispatch='capacity' would drop"),
    ('slices=4,upcycle_from=/x', {'model.moe.num_shared_experts': 1},
     'num_shared_experts=1: a fresh shared expert'),
    ('upcycle_from=/x', {}, 'needs model.moe.slices >= 1'),
]


@pytest.mark.parametrize('arg, overrides, message', BAD_CONFIGS,
                         ids=[a + str(o) for a, o, _ in BAD_CONFIGS])
def test_bad_fine_grained_configs_fail_in_validate(arg, overrides, message):
  with pytest.raises(ValueError) as err:
    validate(_moe(arg, **overrides), 8)
  assert message in str(err.value) and '\n' not in str(err.value), str(err.value)


def test_bad_config_args_fail_in_the_config_file():
  with pytest.raises(ValueError, match='slices=3 does not divide the dense FFN width '
                                       'model.mlp_dim=512'):
    moe_configs.get_config('tiny,slices=3')


@pytest.mark.parametrize('src, new, message', [
    (lambda: tiny_config(**{'model.mlp_dim': 256}), lambda: _moe('slices=4'),
     'model.mlp_dim: source 256 vs 128'),
    (lambda: tiny_config(**{'model.mlp_dim': 256}),
     lambda: _moe('slices=4', **{'model.mlp_dim': 256}),
     'model.moe.mlp_dim=32 x model.moe.slices=4 must equal the source FFN width 256'),
    (tiny_config, lambda: _moe('slices=4', **{'model.num_layers': 4}),
     'num_layers: source 2 vs 4'),
    (lambda: _moe('slices=4'), lambda: _moe('slices=4'), 'got a MoE model'),
])
def test_incompatible_sources_raise_one_clear_error(src, new, message):
  with pytest.raises(ValueError) as err:
    upcycle.check_compatible(state_lib.model_spec(src()), state_lib.model_spec(new()))
  assert message in str(err.value) and '\n' not in str(err.value), str(err.value)


SMALL = {'seq_len': 32, 'warmup_steps': 1, 'log_every': 1}


def test_upcycled_run_starts_as_the_dense_run_and_logs_cofiring(data_dir, tmp_path):
  """A dense run trained 2 steps -> `upcycle_from` it: the initial state computes the dense
  checkpoint's logits, and training logs train/layer_1/clone_cofire."""
  src_dir, new_dir = str(tmp_path / 'dense'), str(tmp_path / 'moe')
  src_cfg = tiny_config(total_steps=2, checkpoint_every=2,
                        **{'data.data_dir': data_dir, **SMALL})
  loop.train(src_cfg, src_dir)
  new_cfg = _moe(f'slices=4,experts=8,upcycle_from={src_dir}', total_steps=2,
                 checkpoint_every=2, **{'data.data_dir': data_dir, **SMALL})
  layout = state_lib.state_layout(new_cfg, partitioning.make_mesh(new_cfg.mesh))
  state, _, step = warm_start.upcycle_state(new_cfg, layout)
  assert step == 2 and int(state['step']) == 0
  src_params = warm_start.restore_params(src_dir, layout.mesh)[1]
  batch = random_batch(8, 32)
  want, _ = _logits_and_aux(src_cfg, jax.device_get(nnx.to_pure_dict(src_params)), batch)
  got, _ = _logits_and_aux(new_cfg, jax.device_get(nnx.to_pure_dict(state['params'])), batch)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  loop.train(new_cfg, new_dir, stop_at=1)
  first = metrics.read_metrics(new_dir)[0]
  assert first['train/layer_1/clone_cofire'] == 0.0  # step 1 routes with the zero routers
  assert first['train/layer_1/slice_coverage'] == 1.0
  assert np.isfinite(first['train/loss'])
  ckpt = checkpoint.Checkpointer(new_dir)
  assert ckpt.all_steps() == [1]
  ckpt.close()
