"""PR-MoE pyramid (models/moe_ffn.py; docs/pyramid_upcycle.md): one expert count per MoE
layer. The built model's shapes and parameter count are the spec's, per layer; FLOPs and
the run log's per-layer table follow each layer's count; a uniform config builds exactly
today's tree; the pyramid trains (also expert-parallel, with the residual MLP) and bad
counts fail with one clear error before anything compiles."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs import dense as dense_configs, moe as moe_configs
from models import family as family_lib, moe_ffn, transformer
from tests.helpers import loss_and_grads, tiny_config
from training import checkpoint, flops, loop, metrics, state as state_lib
from training.validate import validate


def _moe(arg, **overrides):
  """configs/moe.py `arg` on tiny_config's shapes (2 layers, D 64, F 128)."""
  return tiny_config(moe_configs.get_config(f'tiny,{arg}'),
                     **{'model.moe.mlp_dim': 128, **overrides})


def _abstract_params(config):
  return nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: state_lib.make_model(config, 0)))[1])


def _size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def test_config_arg_gives_one_count_per_moe_layer():
  c = moe_configs.get_config('tiny,experts=32x10,64x2,k=2')
  assert (c.model.moe.num_experts_per_layer, c.model.moe.num_experts, c.model.moe.k) == (
      '32x10,64x2', 32, 2)
  assert moe_configs.parse_expert_counts('32x10,64x2') == (32,) * 10 + (64,) * 2
  assert moe_configs.parse_expert_counts('4, 8') == (4, 8)
  plain = moe_configs.get_config('tiny')
  assert (plain.model.moe.num_experts_per_layer, plain.model.moe.num_experts) == ('', 8)


@pytest.mark.parametrize('arg', ['experts=4,8,every=1', 'experts=4,8,every=1,residual=1',
                                 'experts=8x1,4x1,every=1,router=expert_choice'])
def test_built_shapes_and_counts_are_the_specs_per_layer(arg):
  config = _moe(arg)
  spec = state_lib.model_spec(config)
  params = _abstract_params(config)
  assert _size(params) == transformer.param_count(spec)
  d, f = spec.embed_dim, spec.moe.mlp_dim
  for i, e in enumerate(spec.ext.num_experts):
    ffn = params['blocks'][i]['ffn']
    assert ffn['experts']['w_gate'].shape == (e, d, f)
    assert ffn['experts']['w_down'].shape == (e, f, d)
    assert ffn['router'].shape == (d, e)
    assert _size(params['blocks'][i]) == moe_ffn.layer_params(spec, i, False)
    # active: attention and norms, the k experts a token visits (c under expert choice),
    # the router and the residual MLP and its mix
    r = spec.moe.router
    visits = r.capacity_factor if r.expert_choice else r.k
    residual = 3 * d * f + 2 * d if spec.moe.residual else 0
    assert moe_ffn.layer_params(spec, i, True) == (
        family_lib.attention_and_norm_params(spec) + visits * 3 * d * f + d * e + residual)


def test_flops_and_layer_table_follow_each_layers_count(caplog):
  pyramid, uniform = _moe('experts=4,8,every=1'), _moe('experts=8,every=1')
  spec, ref = state_lib.model_spec(pyramid), state_lib.model_spec(uniform)
  T, d = pyramid.seq_len, spec.embed_dim
  # Only the routers differ: layer 0 has 4 router columns instead of 8.
  assert flops.layer_flops_per_token(spec, 0, T) == pytest.approx(
      flops.layer_flops_per_token(ref, 0, T) - 6 * d * 4, rel=1e-12)
  assert flops.layer_flops_per_token(spec, 1, T) == flops.layer_flops_per_token(ref, 1, T)
  assert flops.train_flops_per_token(spec, T) == pytest.approx(
      flops.train_flops_per_token(ref, T) - 6 * d * 4, rel=1e-12)
  rows = flops.layer_table(spec, T)
  assert [r['what'] for r in rows] == ['moe E=4 k=2 F=128', 'moe E=8 k=2 F=128']
  assert [r['params'] for r in rows] == [moe_ffn.layer_params(spec, i, False) for i in (0, 1)]
  with caplog.at_level('INFO'):
    lines = flops.log_layer_table(spec, T)
  assert len(lines) == 4 and 'moe E=4 k=2 F=128' in caplog.text
  assert f'{transformer.param_count(spec):,}' in lines[-1]


def test_uniform_config_builds_todays_model():
  today = _moe('experts=8,every=1')
  assert state_lib.model_spec(today).ext is None
  listed = _moe('experts=8,8,every=1')
  shapes = lambda c: jax.tree.map(lambda x: (x.shape, x.dtype), _abstract_params(c))
  assert shapes(listed) == shapes(today)


def test_old_moe_checkpoint_configs_read_and_resume_with_the_new_keys():
  """A saved config from before these keys: the MoE run resumes (no change reported) and
  reads back with '' and 0; a dense run's config gains no model.moe block."""
  for config in (moe_configs.get_config('tiny'), dense_configs.get_config('tiny')):
    saved = json.loads(config.to_json())
    saved['model'].get('moe', {}).pop('num_experts_per_layer', None)
    saved['model'].get('moe', {}).pop('slices', None)
    assert checkpoint.config_changes(saved, config) == []
    back = checkpoint.config_from_saved(saved)
    assert json.loads(back.to_json())['model'] == json.loads(config.to_json())['model']


def test_pyramid_expert_parallel_equals_one_device():
  """Counts 4 and 8 over mesh.expert=4: each layer's experts split over the axis."""
  arg = 'experts=4,8,every=1,residual=1'
  ref_loss, ref_grads, _ = loss_and_grads(_moe(arg, **{'mesh.data': 1}), jax.devices()[:1])
  loss, grads, params = loss_and_grads(_moe(arg, **{'mesh.data': 2, 'mesh.expert': 4}),
                                       jax.devices())
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               grads, ref_grads)
  for i, e in enumerate((4, 8)):
    w = params['blocks'][i]['ffn']['experts']['w_gate'][...]
    assert w.shape[0] == e and w.addressable_shards[0].data.shape[0] == e // 4


def test_pyramid_trains_a_step(data_dir, tmp_path, caplog):
  config = _moe('experts=4,8,every=1,residual=1', total_steps=1, log_every=1,
                checkpoint_every=1, warmup_steps=0, **{'data.data_dir': data_dir})
  with caplog.at_level('INFO'):
    scalars = loop.train(config, str(tmp_path))
  assert np.isfinite(scalars['train/loss'])
  row = metrics.read_metrics(str(tmp_path))[0]
  assert len([k for k in row if k.startswith('train/layer_0/expert_load/')]) == 4
  assert len([k for k in row if k.startswith('train/layer_1/expert_load/')]) == 8
  assert 'moe E=4 k=2 F=128 +residual MLP' in caplog.text  # the per-layer table


BAD = [  # (config arg, overrides, words of the one error)
    ('experts=4,8,8', {}, "num_experts_per_layer='4,8,8' gives 3 expert counts but the model "
                          'has 1 MoE layers (model.num_layers=2, model.moe.every=2)'),
    ('experts=4', {'model.moe.num_experts_per_layer': '4x'}, "each item must be N or NxC"),
    ('experts=4', {'model.moe.num_experts_per_layer': '4,0'}, "got '0'"),
    ('experts=4,6,every=1', {'mesh.data': 2, 'mesh.expert': 4},
     "expert counts [6] are not multiples of mesh.expert=4"),
    ('experts=4,8,every=1', {'model.moe.k': 5}, 'k=5 is more than the 4 experts'),
]


@pytest.mark.parametrize('arg, overrides, message', BAD, ids=[m[:30] for _, _, m in BAD])
def test_bad_pyramids_give_one_clear_error(arg, overrides, message):
  with pytest.raises(ValueError) as err:
    validate(_moe(arg, **overrides), 8)
  assert message in str(err.value) and '\n' not in str(err.value), str(err.value)


def test_bad_config_arg():
  with pytest.raises(ValueError, match="config arg experts='32x,64x2': each item"):
    moe_configs.get_config('tiny,experts=32x,64x2')
