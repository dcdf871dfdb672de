"""Task schedules for alternating gradient descent (AGD; IMP, arXiv 2305.06324, SPEC §4).

AGD trains one model on several tasks, but each optimizer step takes ONE batch from ONE task
and updates on that task's loss alone. This module decides which task each step takes:

  'sample': the paper's. Step t draws task i with probability weight_i / sum_j weight_j.
  'cycle':  the released code's. Passes p = 0, 1, 2, ... go over the tasks in declared order;
            in pass p every task with p % interval_i == 0 contributes one step. The sequence
            repeats after lcm(intervals) passes (passes where no task is due add nothing).

The task of step t is a pure function of (schedule, t), so a schedule's state is its step
counter plus a fingerprint of what fixes the sequence; a checkpoint resumes it exactly:

  tasks = [agd.Task('img', interval=1), agd.Task('vid', interval=2)]
  agd.make_schedule('cycle', tasks).peek(5)  # ['img', 'vid', 'img', 'img', 'vid']
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import numbers

import numpy as np

KINDS = ('sample', 'cycle')
MAX_CYCLE_PASSES = 1 << 20  # lcm(intervals) above this is almost surely a config mistake


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Task:
  """One AGD task (dataset + objective + resolution); the fields not used by a kind are
  ignored by it but still validated."""
  name: str
  weight: float = 1.0  # 'sample': relative probability of taking this task at a step
  interval: int = 1  # 'cycle': contributes one step every `interval` passes

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f'AGD task name must be a non-empty string, got {self.name!r}')
    w = self.weight
    if (not isinstance(w, numbers.Real) or isinstance(w, bool) or not math.isfinite(w)
        or w <= 0):
      raise ValueError(f'AGD task {self.name!r}: weight must be finite and > 0, got {w!r}')
    i = self.interval
    if not _is_int(i) or i < 1:
      raise ValueError(f'AGD task {self.name!r}: interval must be an int >= 1, got {i!r}')


def _check_tasks(tasks) -> tuple[Task, ...]:
  tasks = tuple(tasks)
  if not tasks:
    raise ValueError('AGD needs at least one task')
  if not all(isinstance(t, Task) for t in tasks):
    raise ValueError(f'AGD tasks must be agd.Task, got {tasks!r}')
  names = [t.name for t in tasks]
  dups = sorted({n for n in names if names.count(n) > 1})
  if dups:
    raise ValueError(f'AGD task names must be unique; repeated: {dups}')
  return tasks


def cycle_period(tasks) -> list[str]:
  """One period of the 'cycle' schedule: task names of lcm(intervals) passes, concatenated."""
  tasks = _check_tasks(tasks)
  passes = math.lcm(*(int(t.interval) for t in tasks))
  if passes > MAX_CYCLE_PASSES:
    raise ValueError(f'AGD cycle period of {passes} passes (lcm of intervals '
                     f'{[t.interval for t in tasks]}) exceeds {MAX_CYCLE_PASSES}')
  return [t.name for p in range(passes) for t in tasks if p % t.interval == 0]


def frequencies(kind: str, tasks) -> dict[str, float]:
  """Long-run fraction of steps per task: normalised weights ('sample'), or
  (1/interval_i) / sum_j (1/interval_j) ('cycle', exact over one period)."""
  tasks = _check_tasks(tasks)
  if kind == 'sample':
    total = math.fsum(t.weight for t in tasks)
    return {t.name: t.weight / total for t in tasks}
  if kind == 'cycle':
    period = cycle_period(tasks)
    return {t.name: float(fractions.Fraction(period.count(t.name), len(period))) for t in tasks}
  raise ValueError(f'unknown AGD schedule kind {kind!r}; expected one of {KINDS}')


_GAMMA, _M1, _M2 = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9),
                    np.uint64(0x94D049BB133111EB))


def uniforms(seed: int, steps) -> np.ndarray:
  """Counter-based uniforms in [0, 1): output number `step` (0-based) of SplitMix64 seeded
  with `seed` mod 2**64, top 53 bits. Fixed arithmetic, so stable across numpy versions."""
  z = np.asarray(steps, np.uint64).reshape(-1) + np.uint64(1)
  with np.errstate(over='ignore'):
    z = np.uint64(seed % 2**64) + z * _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
  z ^= z >> np.uint64(31)
  return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


class Schedule:
  """Which task each AGD step takes: `next()` advances; `state()` / `set_state()` save and
  resume; `task_at(step)`, `tasks_at(steps)` and `peek(n)` look without advancing."""

  def __init__(self, kind: str, tasks, seed: int = 0):
    tasks = _check_tasks(tasks)
    if kind not in KINDS:
      raise ValueError(f'unknown AGD schedule kind {kind!r}; expected one of {KINDS}')
    if not _is_int(seed):
      raise ValueError(f'AGD schedule seed must be an int, got {seed!r}')
    self.kind, self.tasks, self.seed, self.step = kind, tasks, int(seed), 0
    self.names = [t.name for t in tasks]
    # What fixes the sequence (besides kind); a saved state must match it to be resumed.
    if kind == 'sample':
      self._fingerprint = {'tasks': self.names, 'weights': [float(t.weight) for t in tasks],
                           'seed': self.seed}
      cdf = np.cumsum(self._fingerprint['weights'])
      self._cdf = cdf / cdf[-1]
      self._cdf[-1] = 1.0  # u < 1 always lands on a task despite rounding
    else:  # the seed does not change a cycle, so it is not part of its fingerprint
      self._fingerprint = {'tasks': self.names, 'intervals': [int(t.interval) for t in tasks]}
      self._period = cycle_period(tasks)

  def tasks_at(self, steps) -> list[str]:
    """Task names of the given global steps (0-based), whatever the current step."""
    steps = np.asarray(steps, np.int64).reshape(-1)
    if steps.size and steps.min() < 0:
      raise ValueError(f'AGD steps must be >= 0, got {steps.min()}')
    if self.kind == 'sample':
      idx = np.searchsorted(self._cdf, uniforms(self.seed, steps), side='right')
      return [self.names[i] for i in idx]
    return [self._period[s] for s in steps % len(self._period)]

  def task_at(self, step: int) -> str:
    return self.tasks_at([step])[0]

  def peek(self, n: int) -> list[str]:
    """The next n tasks, without advancing."""
    return self.tasks_at(np.arange(self.step, self.step + n))

  def next(self) -> str:
    """The task of the current step; advances by one."""
    name = self.task_at(self.step)
    self.step += 1
    return name

  def state(self) -> dict:
    """JSON-serialisable: kind, step and the fingerprint."""
    return {'kind': self.kind, 'step': self.step, **self._fingerprint}

  def set_state(self, state: dict) -> None:
    """Resume from `state()`; rejects a state saved by a schedule with another sequence."""
    expected = {'kind': self.kind, **self._fingerprint}
    for key, want in expected.items():
      got = state.get(key, '<missing>')
      if got != want:
        raise ValueError(f'AGD schedule state mismatch: saved {key}={got!r}, this schedule '
                         f'has {key}={want!r}')
    step = state.get('step')
    if not _is_int(step) or step < 0:
      raise ValueError(f'AGD schedule state: step must be an int >= 0, got {step!r}')
    self.step = int(step)


def make_schedule(kind: str, tasks, seed: int = 0) -> Schedule:
  """A fresh schedule at step 0; kind in KINDS ('sample' | 'cycle')."""
  return Schedule(kind, tasks, seed)
