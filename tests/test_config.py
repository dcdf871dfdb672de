"""Malformed configs and overrides: each gives one clear error before anything compiles."""

import os
import subprocess
import sys

import pytest

from configs import common, dense
from tests.helpers import tiny_config
from training.validate import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD = [  # (overrides, words the error must contain)
    ({'mesh.data': 3}, 'multiplies to 3 devices'),
    ({'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 1}, 'multiplies to 4'),
    ({'mesh.data': -1, 'mesh.fsdp': -1}, 'at most one'),
    ({'mesh.data': 0}, 'mesh.data=0'),
    ({'mesh.data': 8, 'batch_size': 12}, 'batch_size=12 is not divisible by the 8'),
    ({'model.num_heads': 3}, 'model.num_heads=3 x model.head_dim=16'),
    ({'model.num_kv_heads': 3}, 'num_kv_heads=3 must divide'),
    ({'mesh.data': 1, 'mesh.tensor': 8}, 'num_heads=4 is not divisible by mesh.tensor=8'),
    ({'mesh.data': 1, 'mesh.fsdp': 8, 'model.embed_dim': 60, 'model.head_dim': 15},
     'head_dim=15 must be even'),
    ({'total_steps': -5}, 'config.total_steps must be a positive integer'),
    ({'batch_size': 0}, 'config.batch_size must be a positive integer'),
    ({'warmup_steps': 40}, 'warmup_steps=40 must be in'),
    ({'learning_rate': -1.0}, 'learning_rate must be positive'),
    ({'compute_dtype': 'float8'}, "compute_dtype='float8'"),
    ({'model.family': 'nope'}, "model.family='nope'"),
    ({'model.attention_impl': 'flash'}, "attention_impl='flash'"),
    ({'eval.batch_size': 4}, 'eval.batch_size=4 is not divisible'),
    ({'model.vocab_size': 256}, 'vocab_size=256 is smaller than the tokenizer vocabulary'),
]


@pytest.mark.parametrize('overrides,message', BAD, ids=[str(o) for o, _ in BAD])
def test_bad_config_gives_one_clear_error(overrides, message):
  config = tiny_config(**overrides)
  with pytest.raises(ValueError, match=None) as err:
    validate(config, 8)
  assert message in str(err.value), str(err.value)


def test_good_configs_pass_for_every_size():
  for size in common.SIZES:
    validate(dense.get_config(size), 8)


def test_mesh_minus_one_takes_the_remaining_devices():
  assert validate(tiny_config(**{'mesh.data': -1, 'mesh.tensor': 2}), 8) == (4, 1, 1, 2)


@pytest.mark.parametrize('arg,message', [('huge', "unknown size 'huge'"),
                                         ('tiny,foo=1', "unknown config arg key 'foo'"),
                                         ('tiny,foo', 'is not key=value')])
def test_bad_config_arg(arg, message):
  with pytest.raises(ValueError, match=message):
    dense.get_config(arg)


def _run(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def test_unknown_override_key_fails_loudly(tmp_path):
  out = _run('train.py', '--config=configs/dense.py:tiny', f'--workdir={tmp_path}',
             '--config.totl_steps=5')
  assert out.returncode != 0
  assert 'totl_steps' in out.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_invalid_override_stops_before_building_anything(tmp_path):
  out = _run('train.py', '--config=configs/dense.py:tiny', f'--workdir={tmp_path}',
             '--config.mesh.data=3')
  assert out.returncode == 1
  assert 'train.py: error: mesh' in out.stderr and 'multiplies to 3 devices' in out.stderr
  assert 'Traceback' not in out.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')
