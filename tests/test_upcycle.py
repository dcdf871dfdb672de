"""Upcycling (models/upcycle.py, training/warm_start.py): a 4t4i MoMa run from a dense or a
1t1i one. Experts are exact copies of the source FFNs, everything else but the routers is
the source's, the data position carries over and the optimizer/LR schedule restart at 0."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import moe as moe_configs, moma
from core import partitioning
from data import pipeline
from models import moma as moma_lib, upcycle
from tests.helpers import random_batch, tiny_config
from training import checkpoint, loop, metrics, state as state_lib, warm_start

WIDTH = 128  # tiny_config's model.mlp_dim: the experts take the dense FFN's width


def _moma(arg, **overrides):
  return tiny_config(moma.get_config(f'tiny,{arg}'),
                     **{'model.moma.mlp_dim': WIDTH, **overrides})


def _params(config, seed, noise=False):
  """Pure-dict params of a fresh model; `noise` makes every leaf distinct from any init
  (norm scales are all ones at init, so equal-by-coincidence would go unnoticed)."""
  params = nnx.to_pure_dict(nnx.split(state_lib.make_model(config, seed))[1])
  if noise:
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    params = tree.unflatten([x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                             for x, k in zip(leaves, keys)])
  return jax.device_get(params)


def _spec(config):
  return state_lib.model_spec(config)


def _source_ffn(src, layer, modality, dense):
  """Source FFN weights {w_gate, w_up, w_down} serving `modality` at `layer`."""
  ffn = src['blocks'][layer]['ffn']
  return dict(ffn) if dense else {k: v[modality] for k, v in ffn['experts'].items()}


@pytest.mark.parametrize('source', ['dense', '1t1i'])
def test_upcycled_params_copy_the_source(source):
  dense = source == 'dense'
  src_cfg = tiny_config() if dense else _moma('groups=1t1i,mod=1')
  new_cfg = _moma(f'groups=4t4i,shared=2,mod=1{",norm=pre" if dense else ""}')
  src, fresh = _params(src_cfg, 0, noise=True), _params(new_cfg, 1)
  new_spec = _spec(new_cfg)
  out = jax.device_get(jax.jit(
      lambda s, n: upcycle.upcycle(_spec(src_cfg), s, new_spec, n))(src, fresh))

  eq = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  for key in ('embed', 'final_norm', 'lm_head'):
    assert eq(out[key], src[key]), key
  for i in range(new_cfg.model.num_layers):
    o, s, f = out['blocks'][i], src['blocks'][i], fresh['blocks'][i]
    for key in ('attn', 'attn_norm', 'ffn_norm'):
      assert eq(o[key], s[key]), (i, key)
    for key in ('router', 'aux_routers'):  # the new run's fresh init
      assert eq(o['ffn'][key], f['ffn'][key]), (i, key)
    experts = o['ffn']['experts']
    for g, off in zip(new_spec.moma.groups, new_spec.moma.offsets):
      for j in range(off, off + g.experts):
        got = {k: v[j] for k, v in experts.items()}
        if g.name == moma_lib.SHARED:  # the mean of the modality FFNs (weights)
          ffns = [_source_ffn(src, i, m, dense) for m in g.modalities]
          want = {k: np.mean([w[k] for w in ffns], axis=0) for k in got}
          for k in got:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
        else:
          assert eq(got, _source_ffn(src, i, g.modalities[0], dense)), (i, g.name, j)
    if 'mod' in o:  # a MoD router at the same source layer is copied; aux routers fresh
      assert eq(o['mod']['router'], (f if dense else s)['mod']['router']), i
      assert eq(o['mod']['aux_router'], f['mod']['aux_router']), i


def test_dense_into_1t1i_pre_norm_is_the_same_function():
  src_cfg, new_cfg = tiny_config(), _moma('groups=1t1i,norm=pre')
  src, fresh = _params(src_cfg, 0, noise=True), _params(new_cfg, 1)
  new = upcycle.upcycle(_spec(src_cfg), src, _spec(new_cfg), fresh)
  batch = random_batch(4, 32)

  def logits(config, pure):
    graphdef, state = nnx.split(state_lib.make_model(config, 0))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)(batch)[0]

  np.testing.assert_allclose(logits(new_cfg, new), logits(src_cfg, src), rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize('src_cfg, new_cfg, match', [
    (tiny_config(), _moma('groups=4t4i'), r"norm='res_post'.*dense Block is pre-norm"),
    (_moma('groups=1t1i'), _moma('groups=4t4i,norm=pre'), "norm='pre' differs"),
    (tiny_config(), _moma('groups=4t4i,norm=pre', **{'model.num_layers': 3}),
     'num_layers: source 2 vs 3'),
    (tiny_config(), _moma('groups=4t4i,norm=pre', **{'model.moma.mlp_dim': 64}),
     'mlp_dim=64.*source FFN width 128'),
    (_moma('groups=2t1i'), _moma('groups=4t4i'), 'dense or a 1-expert-per-modality'),
    (_moma('groups=1t1i,shared=1'), _moma('groups=4t4i'), 'dense or a 1-expert'),
    (tiny_config(moe_configs.get_config('tiny')), _moma('groups=4t4i,norm=pre'),
     'got a MoE model'),
])
def test_incompatible_sources_raise_clear_errors(src_cfg, new_cfg, match):
  with pytest.raises(ValueError, match=match):
    upcycle.check_compatible(_spec(src_cfg), _spec(new_cfg))


class _Recording:
  """The loop's data iterator, keeping the batches it yields."""

  def __init__(self, it):
    self.it, self.batches = it, []

  def __iter__(self):
    return self

  def __next__(self):
    self.batches.append(next(self.it))
    return self.batches[-1]

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


SMALL = {'seq_len': 64, 'warmup_steps': 1, 'log_every': 1}


@pytest.fixture(scope='module')
def source(data_dir, tmp_path_factory):
  """A 1t1i run trained 4 steps: (its workdir, config, data iterator state at step 4)."""
  src_dir = str(tmp_path_factory.mktemp('upcycle') / 'src')
  cfg = _moma('groups=1t1i', total_steps=4, checkpoint_every=4,
              **{'data.data_dir': data_dir, **SMALL})
  loop.train(cfg, src_dir)
  ckpt = checkpoint.Checkpointer(src_dir)
  data = ckpt.restore(4, state_lib.state_layout(cfg, partitioning.make_mesh(cfg.mesh)).abstract)[1]
  ckpt.close()
  return src_dir, cfg, data


def _counts(opt_state):
  """The optimizer's step counters (they drive the LR schedule)."""
  return {int(c) for p, c in jax.tree_util.tree_leaves_with_path(opt_state)
          if 'count' in jax.tree_util.keystr(p)}


def test_upcycled_run_keeps_data_position_and_restarts_schedule(source, tmp_path,
                                                                monkeypatch):
  src_dir, src_cfg, src_data = source
  new_dir = str(tmp_path / 'new')
  # 8 experts over mesh.expert=8: the source's 2 experts are read replicated on that axis.
  new_cfg = _moma(f'groups=4t4i,upcycle_from={src_dir}', total_steps=4, checkpoint_every=2,
                  **{'data.data_dir': src_cfg.data.data_dir, 'mesh.data': 1,
                     'mesh.expert': 8, **SMALL})
  assert new_cfg.model.moma.gumbel
  layout = state_lib.state_layout(new_cfg, partitioning.make_mesh(new_cfg.mesh))
  state, data_state, step = warm_start.upcycle_state(new_cfg, layout)
  assert (step, data_state, int(state['step']), _counts(state['opt_state'])) == (
      4, src_data, 0, {0})  # fresh optimizer and LR schedule, the source's data position
  src_params = nnx.to_pure_dict(warm_start.restore_params(src_dir, layout.mesh)[1])
  new_params = nnx.to_pure_dict(state['params'])
  for i in range(2):
    np.testing.assert_array_equal(new_params['blocks'][i]['ffn']['experts']['w_up'],
                                  np.repeat(src_params['blocks'][i]['ffn']['experts']['w_up'],
                                            4, axis=0))
    np.testing.assert_array_equal(new_params['blocks'][i]['attn']['wq'],
                                  src_params['blocks'][i]['attn']['wq'])
  np.testing.assert_array_equal(new_params['lm_head'], src_params['lm_head'])

  recorded = []
  make = pipeline.make_train_iterator
  monkeypatch.setattr(loop.pipeline, 'make_train_iterator',
                      lambda *a, **k: recorded.append(_Recording(make(*a, **k))) or recorded[-1])
  loop.train(new_cfg, new_dir, stop_at=2)
  expected = make(src_cfg.data, seq_len=src_cfg.seq_len, global_batch_size=src_cfg.batch_size,
                  seed=src_cfg.seed)
  expected.set_state(src_data)  # the batch the source run would have seen next
  for key, value in next(expected).items():
    np.testing.assert_array_equal(recorded[0].batches[0][key], value, err_msg=key)
  first = metrics.read_metrics(new_dir)[0]
  assert first['step'] == 1
  assert first['train/lr'] == pytest.approx(float(state_lib.lr_schedule(new_cfg)(0)))

  # Resuming reads the run's own checkpoint and ignores upcycle_from (here: gone). At
  # stop_at=2 nothing is left to run, so nothing compiles.
  new_cfg.upcycle_from = str(tmp_path / 'gone')
  loop.train(new_cfg, new_dir, stop_at=2)
  ckpt = checkpoint.Checkpointer(new_dir)
  assert ckpt.all_steps() == [2]
  saved, saved_data = ckpt.restore(2, layout.abstract)
  ckpt.close()
  assert int(saved['step']) == 2 and _counts(saved['opt_state']) == {2}  # not 4 + 2
  assert saved_data['next_index'] == src_data['next_index'] + 2


@pytest.mark.parametrize('src, overrides, match', [
    ('missing', {}, 'no such directory'),
    ('empty', {}, 'has no checkpoint'),
    ('1t1i', {'model.num_layers': 3}, 'num_layers: source 2 vs 3'),
    ('1t1i', {'model.moma.norm': 'pre'}, "norm='pre' differs"),
    ('1t1i', {'batch_size': 16}, 'same data stream.*batch_size: 8 vs 16'),
])
def test_bad_upcycle_source_fails_before_training(source, tmp_path, src, overrides, match):
  src_dir, src_cfg, _ = source
  if src != '1t1i':
    src_dir = str(tmp_path / 'src')
    if src == 'empty':
      (tmp_path / 'src').mkdir()
  config = _moma(f'groups=4t4i,upcycle_from={src_dir}',
                 **{'data.data_dir': src_cfg.data.data_dir, **SMALL, **overrides})
  with pytest.raises(ValueError, match=match) as err:
    loop.train(config, str(tmp_path / 'new'))
  assert src_dir in str(err.value)
  assert checkpoint.Checkpointer(str(tmp_path / 'new')).latest_step() is None
