"""The entry points as a user runs them: train.py then eval.py in a temp workdir. (SIGTERM
and kill -9 mid-run: tests/test_fault_tolerance.py; several processes: test_multihost.py.)"""

import json
import os
import subprocess
import sys

from training import checkpoint, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--config.model.num_layers=2', '--config.model.embed_dim=64',
         '--config.model.head_dim=16', '--config.model.mlp_dim=128', '--config.batch_size=8',
         '--config.seq_len=96', '--config.eval.batch_size=16', '--config.eval.num_examples=64']


def _cmd(script, workdir, data_dir, *extra):
  return [sys.executable, script, '--config=configs/dense.py:tiny', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', *SMALL, *extra]


def _env():
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}  # one CPU device


def test_train_then_eval(data_dir, tmp_path):
  run = lambda *c: subprocess.run(c, cwd=ROOT, env=_env(), capture_output=True, text=True,
                                  timeout=600)
  out = run(*_cmd('train.py', tmp_path, data_dir, '--config.total_steps=30',
                  '--config.warmup_steps=3', '--config.log_every=10',
                  '--config.checkpoint_every=15'))
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'tok/s' in out.stderr and 'ETA' in out.stderr and 'TFLOP/s' in out.stderr
  rows = metrics.read_metrics(str(tmp_path))
  assert [r['step'] for r in rows] == [10, 20, 30]
  for key in ('train/loss', 'train/loss/text', 'train/loss/image', 'perf/tokens_per_s'):
    assert key in rows[-1], key
  assert rows[-1]['train/loss'] < rows[0]['train/loss']
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tb'))
  assert checkpoint.Checkpointer(str(tmp_path)).all_steps() == [15, 30]

  out = run(*_cmd('eval.py', tmp_path, data_dir))
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads((tmp_path / 'eval.json').read_text())
  assert report['step'] == 30
  assert set(report['modalities']) == {'text', 'image'}
  for mod in report['modalities'].values():
    assert {'loss', 'unigram_loss', 'accuracy'} <= set(mod)
    assert 0 < mod['loss'] and 0 < mod['unigram_loss'] and 0 <= mod['accuracy'] <= 1
  assert (tmp_path / 'loss_curves.png').stat().st_size > 10_000
