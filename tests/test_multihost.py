"""Multi-process runs: 2 processes x 4 fake CPU devices against 1 process x 8, launched as a
user launches them (train.py --coordinator_address --num_processes --process_id): equal
losses, one metrics writer, and a SIGTERM to one process checkpointing the same step on both;
and the validation of those flags."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from training import checkpoint, distributed, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/moe.py:tiny shrunk; mesh data=2 x expert=4 puts the experts of a process's batch
# on the other process too. Each process reads its own rows of the same global batches as a
# 1-process run (data/pipeline.py), so losses must agree up to summation order.
ARGS = ['--config=configs/moe.py:tiny', '--config.model.num_layers=1',
        '--config.model.moe.every=1', '--config.model.embed_dim=64',
        '--config.model.head_dim=16', '--config.model.mlp_dim=128',
        '--config.model.moe.mlp_dim=128', '--config.batch_size=8', '--config.seq_len=96',
        '--config.mesh.data=2', '--config.mesh.expert=4', '--config.total_steps=1000',
        '--config.warmup_steps=2', '--config.log_every=1', '--config.checkpoint_every=1000']
MIN_STEPS = 4  # logged steps the 2-process run reaches before its SIGTERM
REF_STEPS = 8  # logged steps of the 1-process reference (then killed: it is only a reference)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _train(workdir, data_dir, devices, name, *extra):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  log = open(f'{workdir}.{name}.log', 'w+')  # a file, not a pipe: never fills up
  proc = subprocess.Popen(
      [sys.executable, 'train.py', *ARGS, f'--workdir={workdir}',
       f'--config.data.data_dir={data_dir}', *extra],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
  proc.log = log
  return proc


def _stderr(proc) -> str:
  proc.log.seek(0)
  return proc.log.read()


def _wait_for_steps(workdir, procs, steps):
  deadline = time.time() + 240
  while len(metrics.read_metrics(str(workdir))) < steps:
    dead = [p for p in procs if p.poll() is not None]
    assert not dead and time.time() < deadline, _stderr(dead[0])[-3000:] if dead else ''
    time.sleep(0.1)


def test_two_processes_train_like_one_and_checkpoint_together_on_sigterm(data_dir, tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  port = _free_port()
  ref = _train(one, data_dir, 8, 'ref')
  procs = [_train(two, data_dir, 4, i, f'--coordinator_address=127.0.0.1:{port}',
                  '--num_processes=2', f'--process_id={i}') for i in range(2)]
  try:
    _wait_for_steps(one, [ref] + procs, REF_STEPS)
    ref.kill()
    _wait_for_steps(two, procs, MIN_STEPS)
    procs[1].send_signal(signal.SIGTERM)  # SIGTERM reaches process 1 only
    for p in procs:
      p.wait(timeout=120)
  finally:
    for p in procs + [ref]:
      if p.poll() is None:
        p.kill()
        p.wait()
  errs = [_stderr(p) for p in procs]
  for p in procs + [ref]:
    p.log.close()
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]
  for err in errs:  # both decided together, at the sync step
    assert 'preemption notice: all 2 processes checkpoint step' in err, err[-3000:]
  assert 'process 1 of 2, coordinator' in errs[1]

  rows_one, rows_two = metrics.read_metrics(str(one)), metrics.read_metrics(str(two))
  steps = [r['step'] for r in rows_two]
  assert steps == list(range(1, len(steps) + 1)), steps  # one writer: process 0
  assert len(os.listdir(two / 'tb')) == 1
  ckpt = checkpoint.Checkpointer(str(two))
  try:
    assert ckpt.all_steps() == [steps[-1]]  # the step both processes reached and saved
    assert ckpt.read_config(steps[-1])['mesh']['expert'] == 4
  finally:
    ckpt.close()

  n = min(len(rows_one), len(rows_two))
  assert n >= MIN_STEPS and [r['step'] for r in rows_one[:n]] == steps[:n]
  for key in ('train/loss', 'train/loss/text', 'train/loss/image', 'train/grad_norm',
              'train/layer_0/load_balance_loss'):
    np.testing.assert_allclose([r[key] for r in rows_two[:n]],
                               [r[key] for r in rows_one[:n]], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize('args, message', [
    (('127.0.0.1:1234', 2, None), r'go together: .*--process_id missing'),
    ((None, None, 0), r'go together: --process_id=0 given, --coordinator_address and '
                      r'--num_processes missing'),
    (('127.0.0.1', 2, 0), r'--coordinator_address=.* must be HOST:PORT'),
    (('127.0.0.1:1234', 0, 0), r'--num_processes=0 must be >= 1'),
    (('127.0.0.1:1234', 2, 2), r'--process_id=2 must be in \[0, 2\)'),
    (('127.0.0.1:1234', 2, -1), r'--process_id=-1 must be in \[0, 2\)'),
])
def test_distributed_flags_are_checked_before_anything_starts(args, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(*args)
  assert distributed.check_args('127.0.0.1:1234', 2, 1)
  assert not distributed.check_args(None, None, None)
