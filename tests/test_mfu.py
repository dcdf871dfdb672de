"""benchmarks/mfu.py: its dry run on the 8 fake CPU devices (tests/conftest.py) for every
family at the 1B-class width, the memory and MFU arithmetic it reports, and one timed tiny
step through the measured path."""

import functools
import types

import numpy as np
import pytest

from benchmarks import mfu, timing
from training import state as state_lib

FAMILIES = ('dense', 'moe', 'moma', 'mot')
# The 1b config (D 2048, F 8192, 16 heads) with as many layers as one period of its layer
# pattern (MoE: a MoE FFN every 2nd layer), one sequence of 64 per device on fsdp=8: each
# compile takes seconds instead of minutes (docs/performance.md has the full depth).
PERIOD = {'dense': 1, 'moe': 2, 'moma': 1, 'mot': 1}
B, T = 8, 64
FSDP8, FSDP2 = (1, 8, 1, 1), (1, 2, 1, 1)
BATCH_KEYS = 5  # tokens, targets, modality, target_modality, loss_mask: 4 bytes each


def _config(family, layers, mesh):
  config = mfu.make_config(family, '1b', batch_size=B, seq_len=T)
  config.model.num_layers = layers
  return config, mfu.mesh_for(config, mesh)


@functools.cache
def _dry(family, layers, mesh):
  """(plan, dry-run row) of the 1b config of `family` cut to `layers` layers on `mesh`."""
  config, mesh = _config(family, layers, mesh)
  return mfu.plan(config, mesh), mfu.dry_run(config, mesh, device_memory_gib=(80, 141))


@pytest.mark.parametrize('family', FAMILIES)
def test_dry_run_every_family_at_1b(family):
  plan, row = _dry(family, PERIOD[family], FSDP8)
  assert plan['devices'] == 8 and plan['batch_per_device'] == 1
  assert plan['compute_dtype'] == 'bfloat16' and plan['remat']  # the 1b defaults
  assert 0 < plan['active_params'] <= plan['params']
  assert (plan['active_params'] == plan['params']) == (family == 'dense')
  assert all(row[f] > 0 for f in mfu.MEMORY_FIELDS)
  # The donated state is updated in place: every byte of the state's shard is aliased...
  assert row['alias'] == row['state_bytes']
  # ...and the arguments are that shard plus (at most) one device's batch.
  batch_bytes = BATCH_KEYS * 4 * (B // 8) * T
  assert row['state_bytes'] <= row['argument'] <= row['state_bytes'] + batch_bytes
  assert row['output'] >= row['alias']  # the new state + the step's metrics
  # The state is f32 params + two f32 Adam moments, split 8 ways (norms replicated: < 1%).
  assert row['state_bytes'] == pytest.approx(12 * plan['params'] / 8, rel=0.01)
  assert row['peak'] == row['argument'] + row['output'] - row['alias'] + row['temp']
  assert row['fits'] == {'80 GiB': True, '141 GiB': True}
  assert bool(row['compiler_options']) == (family in mfu.CPU_COMPILE_OPTIONS)


def test_fsdp_over_more_devices_cuts_per_device_argument_bytes():
  (_, two), (_, eight) = _dry('dense', 1, FSDP2), _dry('dense', 1, FSDP8)
  # Everything but the replicated norm scales is split: 4x fewer bytes on 4x the devices.
  for field in ('argument', 'alias'):
    assert 3.9 < two[field] / eight[field] <= 4.0, field


def test_realistic_per_device_batch_and_mfu_arithmetic():
  config = mfu.make_config('dense', '1b')  # 512 x 4096 over FSDP on 8 devices
  assert mfu.plan(config, mfu.mesh_for(config))['batch_per_device'] == 64
  assert mfu.datasheet_peak('NVIDIA H100 80GB HBM3') == 989e12
  assert mfu.datasheet_peak('NVIDIA H200') == 989e12
  assert mfu.datasheet_peak('NVIDIA H100 PCIe') == 756e12
  assert mfu.datasheet_peak('NVIDIA A100-SXM4-80GB') == 312e12
  assert mfu.datasheet_peak('TPU v5 lite') == 197e12
  assert mfu.datasheet_peak('TPU v5') == 459e12
  assert mfu.datasheet_peak('cpu') is None
  # 8 devices at 989 TFLOP/s for 2 s is 15.8 PFLOP; half of that is 50% MFU.
  rate, mfu_ = mfu.utilisation(0.5 * 8 * 989e12 * 2.0, 2.0, 8, 989e12)
  assert rate == pytest.approx(0.5 * 8 * 989e12) and mfu_ == pytest.approx(0.5)
  assert mfu.utilisation(1e12, 1.0, 1, None) == (1e12, None)
  # The per-repeat ratio to the matmul, then the median: (10/1)/(20/2), (10/2)/(20/2), ...
  assert timing.matmul_ratio([(1.0, 2.0), (2.0, 2.0), (4.0, 2.0)], 10.0, 20.0) == 0.5
  gib = 2 ** 30
  stats = types.SimpleNamespace(argument_size_in_bytes=50 * gib, output_size_in_bytes=50 * gib,
                                alias_size_in_bytes=49 * gib, temp_size_in_bytes=29 * gib)
  row = mfu.memory_row(stats, (80, 141))
  assert row['peak'] == 80 * gib and row['fits'] == {'80 GiB': True, '141 GiB': True}
  assert mfu.memory_row(stats, (79.5,))['fits'] == {'79.5 GiB': False}
  assert mfu.parse_mesh('1x-1x1x1') == (1, -1, 1, 1)
  with pytest.raises(ValueError, match='DATAxFSDP'):
    mfu.parse_mesh('8x1')


def test_measured_path_on_a_tiny_config():
  config = mfu.make_config('dense', 'tiny', batch_size=8, seq_len=32)
  config.model.num_layers = 1  # the path, not the model, is under test: compile less
  mesh = mfu.mesh_for(config, (1, 1, 1, 1))
  matmul = {'timer': timing.matmul_timer(128, config.compute_dtype), 'n': 128}
  row = mfu.measure(config, mesh, matmul, warmup=1, repeats=1, repeat_seconds=0.01,
                    device_memory_gib=(80,), peak=None)
  assert row['repeats'] == 1 and row['step_ms'] > 0
  assert row['tokens_per_s'] == pytest.approx(8 * 32 / (row['step_ms'] / 1e3))
  flops = mfu.plan(config, mesh)['model_flops_per_step']
  assert row['model_flops_per_s'] == pytest.approx(flops / (row['step_ms'] / 1e3))
  assert row['mfu_datasheet'] is None  # CPU: no datasheet peak
  assert np.isfinite(row['mfu_matmul']) and row['mfu_matmul'] > 0
  layout = state_lib.state_layout(config, mesh)
  assert row['alias'] == mfu.state_bytes_per_device(layout.abstract)
  assert row['fits'] == {'80 GiB': True} and row['device_peak_bytes'] is None
