"""Object-store workdirs (`gs://`) end to end against a local GCS emulator
(tests/gcs_emulator.py): train, SIGTERM, resume, an incomplete step set aside, the config
guard, the lock, eval. Nothing here reaches the network."""

import json
import os
import signal
import subprocess
import sys

import pytest

from tests import gcs_emulator
from tests.test_fault_tolerance import ROOT, _launch, _signal_after
from training import checkpoint, lock, metrics, storage

RUN = 'gs://bucket/run'


@pytest.fixture(scope='module')
def gcs(data_dir, tmp_path_factory):
  """The emulator, with the prepared mm_shapes at gs://bucket/tfds; mirrors of it go to a
  temporary cache."""
  import gcsfs
  from data import remote
  server, env = gcs_emulator.start()
  env = {**env, remote.CACHE_ENV: str(tmp_path_factory.mktemp('data_cache'))}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # this process and the train.py / eval.py it starts
  gcsfs.GCSFileSystem().put(os.path.join(data_dir, 'mm_shapes'), 'bucket/tfds/mm_shapes',
                            recursive=True)
  try:
    yield env
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _error_line(stderr: str, program: str) -> str:
  lines = [line for line in stderr.splitlines() if line.startswith(f'{program}: error:')]
  assert len(lines) == 1 and 'Traceback' not in stderr, stderr[-3000:]
  return lines[0]


def test_storage_on_an_object_store(gcs):
  """What object stores lack (append, O_EXCL, rename) behaves as on a local disk."""
  d = f'{RUN}_storage'
  assert not storage.exists(d) and storage.listdir(d) == []
  storage.makedirs(d)  # nothing to make: directories are implicit
  storage.append_text(f'{d}/log', 'a\n')
  storage.append_text(f'{d}/log', 'b\n')
  assert storage.read_text(f'{d}/log') == 'a\nb\n'  # appended, not overwritten
  assert storage.create_exclusive(f'{d}/lock', 'one')
  assert not storage.create_exclusive(f'{d}/lock', 'two')
  assert storage.read_text(f'{d}/lock') == 'one'
  storage.write_text(f'{d}/sub/x', '1')
  storage.rename(f'{d}/sub', f'{d}/moved')
  assert storage.listdir(d) == ['lock', 'log', 'moved'] and storage.isdir(f'{d}/moved')
  assert storage.resolve(d + '/') == d and storage.free_bytes(d) is None


def test_train_sigterm_resume_eval_on_gcs(gcs, data_dir):
  proc = _launch(RUN, data_dir, total_steps=16, checkpoint_every=100)
  stderr = _signal_after(proc, RUN, 5, signal.SIGTERM)
  assert proc.returncode == 0, stderr[-3000:]
  ckpt = checkpoint.Checkpointer(RUN, create=False)
  stopped = ckpt.latest_step()
  ckpt.close()
  assert stopped is not None and 5 <= stopped < 16
  assert not storage.exists(f'{RUN}/{lock.NAME}')  # released

  # A step directory without its files (a save cut short) is set aside, never read.
  storage.write_text(f'{RUN}/checkpoints/99/state/_METADATA', '{}')
  # Another live run's lock (another host: it cannot be checked from here) is refused.
  storage.write_text(f'{RUN}/{lock.NAME}', json.dumps(
      {'host': 'tpu-vm-7', 'pid': 1, 'since': 0, 'processes': 4}))
  proc = _launch(RUN, data_dir, total_steps=16, checkpoint_every=100)
  _, stderr = proc.communicate(timeout=300)
  line = _error_line(stderr, 'train.py')
  assert 'in use by another run (host tpu-vm-7' in line and f'delete {RUN}/lock' in line
  storage.remove(f'{RUN}/{lock.NAME}')

  # Resumed with the dataset read from the bucket (mirrored to the local cache).
  proc = _launch(RUN, 'gs://bucket/tfds', total_steps=16, checkpoint_every=100)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  assert 'mirrored' in stderr
  assert f'resuming from {RUN}/checkpoints/{stopped}' in stderr
  assert 'not a complete checkpoint; moved to' in stderr
  assert '99.incomplete' in storage.listdir(f'{RUN}/checkpoints')
  steps = [r['step'] for r in metrics.read_metrics(RUN)]
  assert steps == sorted(set(steps)) and steps[-1] == 16  # every step once

  # eval.py reads the saved config from the bucket: a different --config is refused.
  common = [f'--workdir={RUN}', f'--config.data.data_dir={data_dir}']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  bad = subprocess.run([sys.executable, 'eval.py', '--config=configs/dense.py:tiny', *common],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1
  assert 'model.num_layers: 2 -> 4' in _error_line(bad.stderr, 'eval.py')
  assert not storage.exists(f'{RUN}/eval.json')  # nothing written on failure
  ok = subprocess.run([sys.executable, 'eval.py', f'--workdir={RUN}'], cwd=ROOT, env=env,
                      capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-3000:]
  report = json.loads(storage.read_text(f'{RUN}/eval.json'))
  assert report['step'] == 16 and set(report['modalities']) == {'text', 'image'}
  assert 'loss_curves.png' in storage.listdir(RUN)


def test_a_data_dir_on_an_object_store_is_mirrored_once(gcs, data_dir, tmp_path, monkeypatch):
  import numpy as np
  from configs import dense
  from data import pipeline, remote
  monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / 'cache'))
  local, mirrored = dense.get_config('tiny').data, dense.get_config('tiny').data
  local.data_dir, mirrored.data_dir = data_dir, 'gs://bucket/tfds/'
  a, _ = pipeline.data_source(local, 'eval_split')
  b, _ = pipeline.data_source(mirrored, 'eval_split')
  assert len(a) == len(b) and len(a) > 0
  for i in (0, len(a) - 1):
    for k in a[i]:
      np.testing.assert_array_equal(np.asarray(a[i][k]), np.asarray(b[i][k]))
  mirror = tmp_path / 'cache' / 'gs' / 'bucket' / 'tfds' / 'mm_shapes'
  stamps = {p: p.stat().st_mtime_ns for p in mirror.rglob('*') if p.is_file()}
  assert stamps and pipeline.dataset_dir(mirrored) == str(tmp_path / 'cache/gs/bucket/tfds')
  assert {p: p.stat().st_mtime_ns for p in mirror.rglob('*') if p.is_file()} == stamps
  mirrored.data_dir = 'gs://bucket/nothing'
  with pytest.raises(ValueError, match='data.data_dir=gs://bucket/nothing: nothing under'):
    pipeline.data_source(mirrored, 'eval_split')
