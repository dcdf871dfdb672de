"""Checkpoints: resume reproduces the uninterrupted run, and a non-finite loss stops the run
by step without saving the bad state. Restore onto other meshes, kill -9 and bad
checkpoints: tests/test_fault_tolerance.py."""

import json
import re

import pytest

from configs import dense, imp
from tests.helpers import tiny_config
from training import checkpoint, loop, metrics


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


def test_non_finite_loss_stops_by_step_without_saving_bad_state(data_dir, tmp_path):
  # An absurd learning rate overflows the parameters within a couple of steps.
  config = _config(data_dir, learning_rate=1e30, warmup_steps=1, checkpoint_every=1,
                   log_every=1)
  with pytest.raises(loop.NonFiniteLossError, match=r'at step (\d+)') as err:
    loop.train(config, str(tmp_path))
  bad_step = int(re.search(r'at step (\d+)', str(err.value)).group(1))
  saved = checkpoint.Checkpointer(str(tmp_path)).all_steps()
  assert saved and max(saved) < bad_step, (saved, bad_step)


def test_keys_added_since_a_checkpoint_read_as_what_their_absence_meant():
  """A checkpoint written before `trainer` and `data.codebook` existed resumes unchanged."""
  for config, trainer in ((dense.get_config('tiny'), 'decoder'), (imp.get_config('tiny'), 'imp')):
    saved = json.loads(config.to_json())
    del saved['trainer'], saved['data']['codebook']
    assert checkpoint.config_changes(saved, config) == []
    config.trainer = 'decoder' if trainer == 'imp' else 'imp'
    assert checkpoint.config_changes(saved, config) == [
        f"trainer: {trainer!r} -> {config.trainer!r}"]
