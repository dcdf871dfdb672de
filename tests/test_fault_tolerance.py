"""Fault tolerance: kill -9 at any moment, elastic restore onto other meshes, and bad
checkpoints / workdirs answered by one clear error with nothing saved lost."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from configs import moe
from tests.helpers import tiny_config
from training import checkpoint, loop, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir, **overrides):
  return tiny_config(**{'data.data_dir': data_dir, **overrides})


def _steps(workdir):
  c = checkpoint.Checkpointer(str(workdir))
  try:
    return c.all_steps()
  finally:
    c.close()


# ---------------------------------------------------------------------------
# kill -9


def _launch(workdir, data_dir, total_steps=60, checkpoint_every=1):
  """train.py on a tiny model, logging every step; with checkpoint_every=1 a save is in
  flight almost all the time."""
  cmd = [sys.executable, 'train.py', '--config=configs/dense.py:tiny', f'--workdir={workdir}',
         f'--config.data.data_dir={data_dir}', '--config.model.num_layers=2',
         '--config.model.embed_dim=64', '--config.model.head_dim=16',
         '--config.model.mlp_dim=128', '--config.batch_size=8', '--config.seq_len=32',
         f'--config.total_steps={total_steps}', '--config.warmup_steps=3',
         '--config.log_every=1', f'--config.checkpoint_every={checkpoint_every}']
  return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu',
                                              'XLA_FLAGS': ''},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _signal_after(proc, workdir, step, sig, delay=0.0):
  """Send `sig` `delay` s after `step` appears in metrics.jsonl; -> the run's stderr."""
  deadline = time.time() + 300
  while not any(r['step'] >= step for r in metrics.read_metrics(str(workdir))):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.05)
  time.sleep(delay)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=60)
  return stderr


def test_kill_9_at_any_moment_resumes_from_the_newest_complete_checkpoint(data_dir,
                                                                        tmp_path):
  rng, newest = random.Random(0), None
  for i in range(2):  # each run is killed a few steps after the furthest step logged so far
    logged = max([r['step'] for r in metrics.read_metrics(str(tmp_path))] or [0])
    proc = _launch(tmp_path, data_dir)
    stderr = _signal_after(proc, tmp_path, logged + rng.randint(2, 6), signal.SIGKILL,
                           delay=rng.uniform(0, 0.3))
    if i:
      assert f'resuming from {tmp_path}/checkpoints/{newest}' in stderr, stderr[-3000:]
    newest = max(_steps(tmp_path))  # complete ones only; incomplete ones are moved aside
  proc = _launch(tmp_path, data_dir)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  assert f'resuming from {tmp_path}/checkpoints/{newest}' in stderr
  assert max(_steps(tmp_path)) == 60
  assert not [d for d in os.listdir(tmp_path / 'checkpoints') if 'tmp' in d]


def test_sigterm_checkpoints_the_step_reached_and_the_next_run_repeats_no_step(data_dir,
                                                                             tmp_path):
  reached = []
  for i in range(2):
    proc = _launch(tmp_path, data_dir, total_steps=100_000, checkpoint_every=100_000)
    stderr = _signal_after(proc, tmp_path, (reached[-1] if reached else 0) + 3,
                           signal.SIGTERM)
    assert proc.returncode == 0, stderr[-3000:]
    if i:
      assert f'resuming from {tmp_path}/checkpoints/{reached[-1]}' in stderr
    reached.append(metrics.read_metrics(str(tmp_path))[-1]['step'])
    assert _steps(tmp_path) == reached[-2:] if i else [reached[0]]
  steps = [r['step'] for r in metrics.read_metrics(str(tmp_path))]
  assert steps == list(range(1, reached[-1] + 1))  # every step once, none repeated


def test_an_incomplete_step_directory_is_set_aside_and_the_run_resumes(data_dir, tmp_path):
  config = _config(data_dir)
  loop.train(config, str(tmp_path), stop_at=20)
  ckpts = tmp_path / 'checkpoints'
  shutil.copytree(ckpts / '20', ckpts / '30')  # a later step missing Orbax's metadata
  os.remove(ckpts / '30' / checkpoint._ORBAX_METADATA)  # pylint: disable=protected-access
  shutil.copytree(ckpts / '20', ckpts / '35.orbax-checkpoint-tmp-1')  # an unfinished save
  assert _steps(tmp_path) == [20]
  assert sorted(os.listdir(ckpts)) == ['20', '30.incomplete', '35.orbax-checkpoint-tmp-1']
  loop.train(config, str(tmp_path))
  assert _steps(tmp_path) == [20, 40]


# ---------------------------------------------------------------------------
# Elastic restore


def test_resume_onto_other_meshes_gives_the_same_next_step_loss(data_dir, tmp_path):
  """configs/moe.py:tiny (shrunk) saved on data 2 x expert 4, resumed on all-data and on
  fsdp 2 x expert 2 x tensor 2."""
  def config(data, fsdp, expert, tensor):
    c = tiny_config(moe.get_config('tiny'), **{
        'data.data_dir': data_dir, 'model.moe.num_experts': 4, 'model.moe.mlp_dim': 64,
        'log_every': 1, 'total_steps': 40})
    c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = data, fsdp, expert, tensor
    return c

  original = (2, 1, 4, 1)
  saved = tmp_path / 'x'.join(map(str, original))
  loop.train(config(*original), str(saved), stop_at=3)
  others = ((8, 1, 1, 1), (1, 2, 2, 2))
  for mesh in others:
    shutil.copytree(saved, tmp_path / 'x'.join(map(str, mesh)))
  losses = {}
  for mesh in (original,) + others:
    run = tmp_path / 'x'.join(map(str, mesh))
    loop.train(config(*mesh), str(run), stop_at=4)
    losses[mesh] = metrics.read_metrics(str(run))[-1]
    assert losses[mesh]['step'] == 4
  ref = losses[original]
  for mesh, row in losses.items():
    for key in ('train/loss', 'train/grad_norm'):
      assert row[key] == pytest.approx(ref[key], rel=2e-5), (mesh, key)


# ---------------------------------------------------------------------------
# Bad checkpoints and workdirs: one clear error each, nothing lost


@pytest.fixture(scope='module')
def saved_run(data_dir, tmp_path_factory):
  """A run stopped at step 20, copied fresh into each test that breaks it."""
  path = tmp_path_factory.mktemp('saved')
  loop.train(_config(data_dir), str(path), stop_at=20)
  return path


def _copy(saved_run, tmp_path):
  shutil.copytree(saved_run, tmp_path / 'run')
  return tmp_path / 'run'


def _files(path):
  return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob('*')
                if p.is_file())


CHANGED = [  # (overrides, allow_config_change, error words)
    ({'learning_rate': 1e-2}, False, 'learning_rate: 0.003 -> 0.01'),
    ({'seed': 7}, False, 'seed: 0 -> 7'),
    ({'total_steps': 80}, False, 'total_steps: 40 -> 80'),
    ({'model.num_layers': 3}, False, 'model.num_layers: 2 -> 3'),
    ({'data.order': 'text_first'}, False, "data.order: 'both' -> 'text_first'"),
    ({'model.mlp_dim': 96}, True, "does not fit this config's model"),
    ({'model.num_layers': 3}, True, 'params/blocks/2/attn/wq: not in the checkpoint'),
]


@pytest.mark.parametrize('overrides,allow,words', CHANGED,
                         ids=[f'{o}-allow={a}' for o, a, _ in CHANGED])
def test_a_workdir_of_another_config_is_refused_naming_the_difference(
    saved_run, tmp_path, data_dir, overrides, allow, words):
  run = _copy(saved_run, tmp_path)
  before = _files(run)
  with pytest.raises(ValueError) as err:
    loop.train(_config(data_dir, **overrides), str(run), allow_config_change=allow)
  assert words in str(err.value), str(err.value)
  if not allow:
    assert '--allow_config_change' in str(err.value)
  assert _files(run) == before


def test_allowed_config_change_resumes(saved_run, tmp_path, data_dir):
  run = _copy(saved_run, tmp_path)
  loop.train(_config(data_dir, learning_rate=1e-3), str(run), allow_config_change=True,
             stop_at=21)
  assert _steps(run) == [20, 21]


def _corrupt_state(run):
  for p in (run / 'checkpoints' / '20' / 'state').rglob('*'):
    if p.is_file() and p.stat().st_size > 0 and 'METADATA' not in p.name.upper():
      p.write_bytes(b'\x00garbage' * 7)


def _corrupt_meta(run):
  for p in (run / 'checkpoints' / '20' / 'meta').rglob('*'):
    if p.is_file():
      p.write_text('{"config": ')


@pytest.mark.parametrize('corrupt,words', [(_corrupt_state, 'cannot restore checkpoint'),
                                           (_corrupt_meta, 'cannot read the config')],
                         ids=['state', 'meta'])
def test_a_corrupt_checkpoint_gives_one_clear_error_and_stays(saved_run, tmp_path, data_dir,
                                                              corrupt, words):
  run = _copy(saved_run, tmp_path)
  corrupt(run)
  before = _files(run)
  with pytest.raises(checkpoint.CheckpointError) as err:
    loop.train(_config(data_dir), str(run))
  assert words in str(err.value) and f'{run}/checkpoints/20' in str(err.value)
  assert _files(run) == before


def test_train_py_names_a_changed_config_and_exits_1(saved_run, tmp_path, data_dir):
  run = _copy(saved_run, tmp_path)
  out = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/dense.py:tiny', f'--workdir={run}',
       f'--config.data.data_dir={data_dir}'], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''})
  assert out.returncode == 1
  assert 'train.py: error:' in out.stderr and 'holds a run of another config' in out.stderr
  assert 'model.embed_dim: 64 -> ' in out.stderr
  assert _steps(run) == [20]
