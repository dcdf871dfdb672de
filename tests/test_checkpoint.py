"""Checkpoints: resume reproduces the uninterrupted run, restore works across meshes, and
a non-finite loss stops the run by step without saving the bad state."""

import re
import shutil

import pytest

from training import checkpoint, loop, metrics
from tests.helpers import tiny_config


def _config(data_dir, **overrides):
  return tiny_config(**{'data.data_dir': data_dir, **overrides})


def _rows(workdir):
  return {r['step']: r for r in metrics.read_metrics(str(workdir))}


def test_resume_reproduces_uninterrupted_run(data_dir, tmp_path):
  config = _config(data_dir)
  loop.train(config, str(tmp_path / 'straight'))
  loop.train(config, str(tmp_path / 'resumed'), stop_at=20)
  assert checkpoint.Checkpointer(str(tmp_path / 'resumed')).latest_step() == 20
  loop.train(config, str(tmp_path / 'resumed'))
  straight, resumed = _rows(tmp_path / 'straight'), _rows(tmp_path / 'resumed')
  assert sorted(straight) == sorted(resumed) == [10, 20, 30, 40]
  for step in (30, 40):
    for key in ('train/loss', 'train/loss/text', 'train/loss/image', 'train/grad_norm'):
      assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-6, abs=1e-6)


def test_restore_onto_another_mesh(data_dir, tmp_path):
  saved_on = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}
  config = _config(data_dir, **saved_on)
  loop.train(config, str(tmp_path / 'a'), stop_at=20)
  shutil.copytree(tmp_path / 'a', tmp_path / 'b')
  loop.train(config, str(tmp_path / 'a'))  # continue on the original mesh
  other = _config(data_dir, **{'mesh.data': 1, 'mesh.fsdp': 4, 'mesh.tensor': 2})
  loop.train(other, str(tmp_path / 'b'))  # continue on another mesh
  a, b = _rows(tmp_path / 'a'), _rows(tmp_path / 'b')
  for step in (30, 40):
    assert b[step]['train/loss'] == pytest.approx(a[step]['train/loss'], rel=1e-4)


def test_non_finite_loss_stops_by_step_without_saving_bad_state(data_dir, tmp_path):
  # An absurd learning rate overflows the parameters within a couple of steps.
  config = _config(data_dir, learning_rate=1e30, warmup_steps=1, checkpoint_every=1,
                   log_every=1)
  with pytest.raises(loop.NonFiniteLossError, match=r'at step (\d+)') as err:
    loop.train(config, str(tmp_path))
  bad_step = int(re.search(r'at step (\d+)', str(err.value)).group(1))
  saved = checkpoint.Checkpointer(str(tmp_path)).all_steps()
  assert saved and max(saved) < bad_step, (saved, bad_step)
