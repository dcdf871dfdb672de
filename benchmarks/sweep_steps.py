"""Step time of every run of an η sweep at its 1x point, against the dense model's, timed in
alternating repeats of one run: the ratios the sweep's wall-clock η divides by.

  python benchmarks/sweep_steps.py --sweep=tiny --json=runs/eta_tiny/step_times.json

Each run's config (configs/sweeps.py, as training/sweep.py plans it: the preset's dataset,
overrides and solved widths) gets its train step built and AOT-compiled as training/loop.py
does, on a random batch of its shape (benchmarks/timing.py). After warm-up, every repeat
times each run's chained steps in turn, so a change in machine load hits all of them alike;
`<run>/dense step time ratio: X` is the median over repeats of run / dense_1x. training/eta.py
uses OUT/step_times.json, when it exists, instead of the training logs' tokens/s (which a
shared machine perturbs run by run).
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from absl import app, flags
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import timing  # noqa: E402
from configs import sweeps  # noqa: E402
from core import partitioning
from training import metrics, sweep  # noqa: E402

_SWEEP = flags.DEFINE_enum('sweep', 'tiny', sorted(sweeps.PRESETS), 'Preset.')
_ONLY = flags.DEFINE_list('only', [], 'Runs to time besides dense_1x (default: all at 1x).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed calls after compilation.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats; the median ratio is used.')
_REPEAT_S = flags.DEFINE_float('repeat_seconds', 2.0, 'Target length of one repeat.')
_JSON = flags.DEFINE_string('json', '', 'Write {run: ratio to dense_1x} here.')


def main(argv):
  del argv
  metrics.quiet_library_logs()
  plan = [r for r in sweep.build_plan(_SWEEP.value) if r.multiplier == 1]
  reference = next(r for r in plan if r.kind == 'dense')
  plan = [reference] + [r for r in plan if r is not reference
                        and (not _ONLY.value or r.name in _ONLY.value)]
  timers = []
  for run in plan:
    config = sweep.load_config(run.config_arg, run.overrides)
    mesh = partitioning.make_mesh(config.mesh)
    timer, _, _, info = timing.compile_step(config, mesh)
    with jax.set_mesh(mesh):
      timer.warm_up(_WARMUP.value, _REPEAT_S.value)
    timers.append((run, mesh, timer))
    print(f'  compiled {run.name} in {info["compile_s"]:.1f}s: '
          f'{timer.calls} steps per repeat', flush=True)
  times = {run.name: [] for run, _, _ in timers}
  for _ in range(_REPEATS.value):
    for run, mesh, timer in timers:
      with jax.set_mesh(mesh):
        times[run.name].append(timer.repeat())
  ratios = {name: statistics.median(t / d for t, d in zip(ts, times[reference.name]))
            for name, ts in times.items()}
  print(f'\n{"run":<18} {"step ms":>8}  ratio to {reference.name}')
  for name, ts in times.items():
    print(f'{name:<18} {statistics.median(ts) * 1e3:>8.1f}  {ratios[name]:.3f}')
  print()
  for name, ratio in ratios.items():
    if name != reference.name:
      print(f'{name}/dense step time ratio: {ratio:.3f}')
  if _JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    with open(_JSON.value, 'w') as f:
      json.dump({'reference': reference.name, 'repeats': _REPEATS.value,
                 'devices': [str(d) for d in jax.devices()],
                 'step_time_ratio': ratios}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
