"""Does building batches slow the train step? The step fed by the real data pipeline against
the same step on one fixed batch, timed in alternating repeats of one run.

  python benchmarks/data_stream.py                                  # mm_scenes, dense tiny
  python benchmarks/data_stream.py --config=configs/dense.py:tiny   # mm_shapes

The train state and the jitted step are built as training/loop.py builds them. "fixed":
`state <- step(state, batch)` on one batch already on device. "stream": the same step on
`next(iterator)` of `pipeline.make_train_iterator`, placed with `partitioning.shard_batch`, as
the training loop does (the host builds the next batch while the device runs the step).
Also the time the iterator alone takes per batch. The last line is `stream/fixed step time
ratio: X`, the median of the per-repeat ratios: 1.0 means the data costs the step nothing.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import timing  # noqa: E402
from data import pipeline  # noqa: E402
from core import partitioning  # noqa: E402
from training.sweep import load_config  # noqa: E402

_CONFIG = flags.DEFINE_string('config', 'configs/dense.py:tiny,data=scenes',
                              'Config file and arg.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed calls after compilation.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats of each; the median is used.')
_REPEAT_S = flags.DEFINE_float('repeat_seconds', 3.0, 'Target length of one repeat.')


def main(argv):
  del argv
  config = load_config(_CONFIG.value)
  mesh = partitioning.make_mesh(config.mesh)
  it = pipeline.make_train_iterator(config.data, seq_len=config.seq_len,
                                    global_batch_size=config.batch_size, seed=0)
  t0 = time.perf_counter()
  host = [next(it) for _ in range(20)]
  build_ms = (time.perf_counter() - t0) / len(host) * 1e3
  fixed, compiled, batch_sh, _ = timing.compile_step(config, mesh, host[0])
  with jax.set_mesh(mesh):
    fixed.warm_up(_WARMUP.value, _REPEAT_S.value)
    stream = timing.Timer(
        lambda s: compiled(s, partitioning.shard_batch(next(it), batch_sh))[0], fixed.carry)
    stream.warm_up(_WARMUP.value, _REPEAT_S.value)
    stream.calls, fixed.carry = fixed.calls, stream.carry  # the state is donated
    times = {'fixed': [], 'stream': []}
    for _ in range(_REPEATS.value):
      times['fixed'].append(fixed.repeat())
      stream.carry = fixed.carry
      times['stream'].append(stream.repeat())
      fixed.carry = stream.carry
  ratio = statistics.median(s / f for s, f in zip(times['stream'], times['fixed']))
  print(f'config {_CONFIG.value}: batch {config.batch_size} x {config.seq_len} tokens '
        f'({config.data.tfds_name})')
  print(f'iterator alone: {build_ms:.1f} ms per batch')
  for name in ('fixed', 'stream'):
    print(f'step on {name:>6} batches: {statistics.median(times[name]) * 1e3:.1f} ms')
  print(f'stream/fixed step time ratio: {ratio:.3f}')


if __name__ == '__main__':
  app.run(main)
