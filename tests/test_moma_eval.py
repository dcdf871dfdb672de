"""MoMa evaluation (training/evaluate.py): per-modality expert load, the causal pass with the
auxiliary routers, the stale-aux-run check and the routing heat map."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import moma as moma_config
from core import partitioning
from training import causal, evaluate, plots, warm_start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODALITIES = ('text', 'image')
EXPERTS = ['text/0', 'text/1', 'image/0', 'image/1', 'image/2']
# 2 layers (a MoD layer 0 and a plain layer 1), sequences of 64, a few steps per stage.
SMALL = ['--config.model.num_layers=2', '--config.batch_size=8', '--config.seq_len=64',
         '--config.warmup_steps=1', '--config.eval.batch_size=16',
         '--config.eval.num_examples=32', '--config.eval.generation.num_examples=8']


def test_load_report_names_every_modality_and_expert():
  load = np.array([[0.5, 0.25, 0.0, 0.0, 0.0],
                   [0.0, 0.0, 1 / 3, 0.125, 1.0]], np.float32)
  report = evaluate.load_report(load, MODALITIES, EXPERTS)
  assert list(report) == ['text', 'image']
  assert list(report['text']) == EXPERTS
  assert report['text'] == {'text/0': 0.5, 'text/1': 0.25, 'image/0': 0.0, 'image/1': 0.0,
                            'image/2': 0.0}
  assert report['image']['image/0'] == pytest.approx(1 / 3)
  assert report['image']['image/2'] == 1.0
  with pytest.raises(ValueError, match='2 modalities x 4 experts'):
    evaluate.load_report(load, MODALITIES, EXPERTS[:4])


def test_routing_report_moma_layers_and_causal_pass():
  load = np.arange(10, dtype=np.float32).reshape(2, 5) / 10
  aux = {'layer_0/load': load, 'layer_0/expert_load': np.full(5, 0.2),
         'layer_0/aux_loss': np.float32(0), 'layer_0/mod/selected_fraction': np.float32(0.25),
         'layer_1/load': load[::-1], 'layer_1/expert_load': np.full(5, 0.2)}
  causal = {'layer_0/load': load * 0, 'layer_0/mod/selected_fraction': np.float32(0.5),
            'layer_0/expert_load': np.full(5, 0.1), 'layer_1/load': load}
  layers = evaluate.routing_report(aux, modality_names=MODALITIES, expert_names=EXPERTS,
                                   causal_aux=causal)['layers']
  assert [e['layer'] for e in layers] == [0, 1]
  l0, l1 = layers
  assert l0['load']['image']['image/2'] == pytest.approx(0.9)
  assert l0['mod_selected_fraction'] == 0.25 and l0['causal_mod_selected_fraction'] == 0.5
  assert l0['expert_load'] == [0.2] * 5 and l0['aux_loss'] == 0.0
  assert set(l0['causal_load']['text'].values()) == {0.0}
  assert 'causal_expert_load' not in l0  # the causal pass adds loads only
  assert l1['load']['text']['text/0'] == pytest.approx(0.5)
  assert l1['causal_load']['text']['text/0'] == 0.0
  assert 'mod_selected_fraction' not in l1
  # Without expert names (MoE families) entries are as before: flat lists, keys untouched.
  moe = evaluate.routing_report({'layer_1/expert_load': np.full(4, 0.25),
                                 'layer_1/dropped_fraction': np.float32(0.1)})
  assert moe == {'layers': [{'layer': 1, 'expert_load': [0.25] * 4,
                             'dropped_fraction': pytest.approx(0.1)}]}


def test_stale_reason_compares_everything_but_the_aux_routers():
  mesh = jax.make_mesh((8,), ('data',))
  main = {'embed': {'embedding': jnp.ones((4, 3))},
          'blocks': {0: {'ffn': {'router': jnp.zeros((3, 5)),
                                 'aux_routers': {0: {'w1': jnp.zeros((3, 1))}}}}}}
  aux_trained = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 1 if 'aux_routers' in jax.tree_util.keystr(path) else x, main)
  assert causal.stale_reason(main, aux_trained, mesh) is None
  moved = jax.tree.map(lambda x: x, aux_trained)
  moved['blocks'][0]['ffn']['router'] = moved['blocks'][0]['ffn']['router'].at[0, 0].set(1e-7)
  assert 'differs from the main checkpoint' in causal.stale_reason(main, moved, mesh)
  other = {'embed': main['embed']}
  assert 'another model structure' in causal.stale_reason(main, other, mesh)


def test_routing_plot_only_for_reports_with_loads(tmp_path):
  assert plots.plot_routing_load(str(tmp_path), {'routing': {'layers': [
      {'layer': 1, 'expert_load': [0.5, 0.5]}]}}) is None
  load = evaluate.load_report(np.full((2, 5), 0.2), MODALITIES, EXPERTS)
  report = {'step': 3, 'routing': {'layers': [
      {'layer': i, 'load': load, 'causal_load': load} for i in range(5)]}}
  path = plots.plot_routing_load(str(tmp_path), report)
  assert path == str(tmp_path / 'routing_load.png') and os.path.getsize(path) > 10_000


def _run(script, config_arg, workdir, data_dir, *extra):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '',  # one CPU device
         'TFDS_DATA_DIR': data_dir}
  out = subprocess.run(
      [sys.executable, script, f'--config=configs/moma.py:{config_arg}',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *SMALL, *extra],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads((workdir / 'eval.json').read_text()) if script == 'eval.py' else None


def _config():
  c = moma_config.get_config('tiny,mod=1')
  c.model.num_layers, c.batch_size, c.seq_len = 2, 8, 64
  return c


def test_train_aux_stage_then_eval_reports_causal_loss_and_loads(data_dir, tmp_path):
  _run('train.py', 'tiny,mod=1', tmp_path, data_dir, '--config.total_steps=6',
       '--config.log_every=3', '--config.checkpoint_every=6')
  report = _run('eval.py', 'tiny,mod=1', tmp_path, data_dir)
  assert report['step'] == 6
  assert 'aux_step' not in report and 'causal_loss_note' not in report
  for mod in report['modalities'].values():
    assert 'causal_loss' not in mod and 'causal_accuracy' not in mod
  assert not any('causal_load' in e for e in report['routing']['layers'])
  assert (tmp_path / 'routing_load.png').exists()
  assert not (tmp_path / 'aux').exists()  # eval looked, created nothing
  assert 'auxiliary routers' in report['generation']['note']  # no causal routing yet

  _run('train.py', 'tiny,mod=1,stage=aux', tmp_path, data_dir, '--config.total_steps=4',
       '--config.log_every=2')
  (tmp_path / 'routing_load.png').unlink()
  report = _run('eval.py', 'tiny,mod=1', tmp_path, data_dir)
  assert report['step'] == 6 and report['aux_step'] == 4
  assert 'causal_loss_note' not in report
  gen = report['generation']  # decoded with the aux run's routers (seq_len 64 holds no image)
  assert gen['step'] == 4 and 'no eval prompt leaves room' in gen['note'], gen
  assert set(report['modalities']) == set(MODALITIES)
  for mod in report['modalities'].values():
    assert np.isfinite(mod['causal_loss']) and mod['causal_loss'] > 0
    assert 0 <= mod['causal_accuracy'] <= 1
  layers = report['routing']['layers']
  assert [e['layer'] for e in layers] == [0, 1]
  assert 0 < layers[0]['mod_selected_fraction'] <= 0.25 + 1e-6  # MoD in layer 0 only
  assert 0 <= layers[0]['causal_mod_selected_fraction'] <= 1
  assert 'mod_selected_fraction' not in layers[1]
  for entry in layers:
    for key in ('load', 'causal_load'):
      load = entry[key]
      assert list(load) == list(MODALITIES)
      assert list(load['text']) == [f'{m}/{j}' for m in MODALITIES for j in range(4)]
      for j in range(4):  # modality groups are exact: no token crosses over
        assert load['text'][f'image/{j}'] == 0.0 and load['image'][f'text/{j}'] == 0.0
      if key == 'load':  # expert choice: each expert takes about c_e = 1/4 of its group
        for m in MODALITIES:
          assert all(0.2 < load[m][f'{m}/{j}'] < 0.35 for j in range(4)), load
  assert (tmp_path / 'routing_load.png').stat().st_size > 10_000

  # A main model that moved on since the aux stage started: no causal pass, a note instead.
  config = _config()
  mesh = partitioning.make_mesh(config.mesh)
  _, main_params, _, step = warm_start.restore_params(str(tmp_path), mesh)
  params, aux_step, note = causal.load_aux_params(str(tmp_path), main_params, step, mesh)
  assert params is not None and aux_step == 4 and note is None
  moved = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 1.01 if 'embed' in jax.tree_util.keystr(path) else x, main_params)
  params, aux_step, note = causal.load_aux_params(str(tmp_path), moved, step, mesh)
  assert params is None and aux_step == 4
  assert 'causal_loss skipped' in note and 'main step 6, aux step 4' in note
