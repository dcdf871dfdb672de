"""Generation from a trained run as a user gets it: eval.json `generation` + samples.png, and
sample.py (text -> image, image -> caption, its one-line errors)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data import pipeline, scoring
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--config.model.num_layers=2', '--config.model.embed_dim=64',
         '--config.model.head_dim=16', '--config.model.mlp_dim=128', '--config.batch_size=8',
         '--config.seq_len=112', '--config.eval.batch_size=16', '--config.eval.num_examples=32',
         '--config.eval.generation.num_examples=16']


def _run(script, workdir, data_dir, *extra, config=True, devices=1):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  args = ['--config=configs/dense.py:tiny', f'--config.data.data_dir={data_dir}', *SMALL]
  return subprocess.run([sys.executable, script, f'--workdir={workdir}',
                         *(args if config else []), *extra],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('gen_run')
  out = _run('train.py', workdir, data_dir, '--config.total_steps=40', '--config.warmup_steps=4',
             '--config.log_every=20', '--config.checkpoint_every=40')
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def test_eval_scores_generations_in_both_directions(trained, data_dir):
  out = _run('eval.py', trained, data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  gen = json.loads((trained / 'eval.json').read_text())['generation']
  assert gen['step'] == 40 and gen['sampling']['temperature'] == 0.0
  samples = json.loads((trained / 'samples.json').read_text())['samples']
  assert len(samples) == 16 and (trained / 'samples.png').stat().st_size > 10_000
  config = tiny_config(**{'data.data_dir': data_dir})
  model = pipeline.floor_model(config.data)[0]
  for direction in ('text_to_image', 'image_to_caption'):
    rows = [s for s in samples if s['direction'] == direction]
    assert gen[direction]['examples'] == len(rows) > 0
    # The reported fraction is the mean of the per-example scores, each as data/scoring.py
    # scores the whole sequence.
    scores = [scoring.score_sequence(np.asarray(s['prompt'] + s['generated']), model)[1]
              for s in rows]
    assert [s['consistent'] for s in rows] == scores
    assert gen[direction]['consistent'] == pytest.approx(np.mean(scores))
  for s in samples:  # the grammar: a generated image is whole, inside BOI .. EOI
    if s['direction'] == 'text_to_image':
      g = s['generated']
      assert all(t >= 264 for t in g[:64]) and g[64] == 4, g


def test_sample_writes_the_grid_and_the_json(trained, data_dir, tmp_path):
  out = _run('sample.py', trained, data_dir, '--prompt=a large red circle at the top left',
             '--from_eval=2', '--num=3', '--seed=1', f'--out={tmp_path}', config=False)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout)
  assert summary['png'] == str(tmp_path / 'sample.png') and summary['seed'] == 1
  assert (tmp_path / 'sample.png').stat().st_size > 10_000
  samples = json.loads((tmp_path / 'sample.json').read_text())['samples']
  assert [s['direction'] for s in samples] == ['text_to_image'] * 3 + ['image_to_caption'] * 3
  for s in samples[:3]:
    assert s['caption'] == 'a large red circle at the top left' and len(s['image_ids']) == 64
    assert isinstance(s['consistent'], bool)
  for s in samples[3:]:
    assert s['generated'][-1] == 2 or len(s['prompt'] + s['generated']) == 112  # EOS or full


def test_sample_on_another_mesh_gives_the_same_greedy_tokens(trained, data_dir, tmp_path):
  args = ['--prompt=a small green square at the center', '--from_eval=1', '--num=2',
          '--temperature=0']
  one = _run('sample.py', trained, data_dir, *args, f'--out={tmp_path / "one"}', config=False)
  two = _run('sample.py', trained, data_dir, *args, f'--out={tmp_path / "two"}',
             '--config.mesh.data=2', '--config.mesh.tensor=2', devices=4)
  assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
  read = lambda d: [s['generated'] for s in json.loads((tmp_path / d / 'sample.json')
                                                        .read_text())['samples']]
  assert read('one') == read('two')


@pytest.mark.parametrize('args,message', [
    (['--prompt='], '--prompt is empty'),
    (['--prompt=' + 'x' * 120], 'the prompt has 122 tokens: no room'),
    (['--prompt=' + 'x' * 50], 'with the image\'s 64 codes and EOI it is longer'),
    (['--image=BAD'], 'is 40x40 px; the model reads 32x32 images'),
    (['--from_eval=5000'], '--from_eval=5000: the eval split'),
    ([], 'nothing to generate'),
])
def test_sample_refuses_bad_arguments_in_one_line(trained, data_dir, tmp_path, args, message):
  from PIL import Image
  bad = tmp_path / 'bad.png'
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(bad)
  args = [a.replace('BAD', str(bad)) for a in args]
  out = _run('sample.py', trained, data_dir, *args, config=False)
  assert out.returncode == 1 and message in out.stderr, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith('sample.py: error: ')
  assert 'Traceback' not in out.stderr


def test_sample_without_a_checkpoint_says_train_first(data_dir, tmp_path):
  out = _run('sample.py', tmp_path / 'none', data_dir, '--prompt=a red square', config=False)
  assert out.returncode == 1 and 'no checkpoint in' in out.stderr and 'train first' in out.stderr
  assert not (tmp_path / 'none').exists()
