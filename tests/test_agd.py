"""AGD task schedules (projects/imp/schedules.py): frequencies, exact cycle order, resume, validation."""

import fractions
import json
import math

import numpy as np
import pytest

from projects.imp import schedules as agd
from projects.imp.schedules import Task

SAMPLE_TASKS = [Task('img', weight=5.0), Task('vid', weight=3.0), Task('txt', weight=2.0)]
CYCLE_TASKS = [Task('a', interval=1), Task('b', interval=2), Task('c', interval=3)]


def test_uniforms_are_splitmix64():
  """Pinned to SplitMix64's published first outputs for seed 0 (top 53 bits)."""
  ref = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
  np.testing.assert_array_equal(agd.uniforms(0, [0, 1, 2]),
                                [(r >> 11) * 2.0**-53 for r in ref])


def test_sample_frequencies_match_weights():
  n = 20000
  seq = agd.make_schedule('sample', SAMPLE_TASKS, seed=3).peek(n)
  freqs = agd.frequencies('sample', SAMPLE_TASKS)
  assert freqs == {'img': 0.5, 'vid': 0.3, 'txt': 0.2}
  for name, p in freqs.items():
    sigma = math.sqrt(n * p * (1 - p))  # binomial std of the count
    assert abs(seq.count(name) - n * p) < 5 * sigma, (name, seq.count(name))


def test_sample_is_a_function_of_seed_and_step():
  s0, s0b, s1 = (agd.make_schedule('sample', SAMPLE_TASKS, seed=s) for s in (0, 0, 1))
  first = [s0.next() for _ in range(200)]
  assert first == s0b.peek(200) == [s0b.task_at(t) for t in range(200)]
  assert first != s1.peek(200)
  assert agd.make_schedule('sample', [Task('only')]).peek(50) == ['only'] * 50


def test_cycle_order_is_exact():
  # passes 0..5 of intervals (1, 2, 3): abc, a, ab, ac, ab, a -> period of 11 steps
  period = ['a', 'b', 'c', 'a', 'a', 'b', 'a', 'c', 'a', 'b', 'a']
  assert agd.cycle_period(CYCLE_TASKS) == period
  s = agd.make_schedule('cycle', CYCLE_TASKS, seed=0)
  assert [s.next() for _ in range(22)] == period * 2
  # passes where no task is due contribute nothing: intervals (2, 3) -> passes 0, 2, 3, 4
  assert agd.cycle_period([Task('x', interval=2), Task('y', interval=3)]) == [
      'x', 'y', 'x', 'y', 'x']


def test_cycle_frequencies_are_exact():
  period = agd.cycle_period(CYCLE_TASKS)
  inv = {t.name: fractions.Fraction(1, t.interval) for t in CYCLE_TASKS}
  expected = {k: v / sum(inv.values()) for k, v in inv.items()}  # 6/11, 3/11, 2/11
  assert {k: fractions.Fraction(period.count(k), len(period)) for k in inv} == expected
  assert agd.frequencies('cycle', CYCLE_TASKS) == {k: float(v) for k, v in expected.items()}


@pytest.mark.parametrize('kind,tasks', [('sample', SAMPLE_TASKS), ('cycle', CYCLE_TASKS)])
def test_resume_continues_the_same_sequence(kind, tasks):
  full = agd.make_schedule(kind, tasks, seed=7)
  expected = [full.next() for _ in range(100)]
  s = agd.make_schedule(kind, tasks, seed=7)
  head = [s.next() for _ in range(37)]
  saved = json.loads(json.dumps(s.state()))
  resumed = agd.make_schedule(kind, tasks, seed=7)
  resumed.set_state(saved)
  assert head + [resumed.next() for _ in range(63)] == expected
  assert resumed.state()['step'] == 100


@pytest.mark.parametrize('kind,tasks,seed,change', [
    ('sample', SAMPLE_TASKS, 0, {'kind': 'cycle'}),
    ('sample', SAMPLE_TASKS, 1, {}),  # another seed
    ('sample', [Task('img', 5.0), Task('vid', 3.0), Task('txt', 2.5)], 0, {}),
    ('sample', [Task('img', 5.0), Task('vid', 3.0)], 0, {}),
    ('cycle', [Task('a', interval=1), Task('b', interval=2), Task('c', interval=4)], 0, {}),
    ('cycle', [Task('a'), Task('c', interval=3), Task('b', interval=2)], 0, {}),
    ('sample', SAMPLE_TASKS, 0, {'step': -1}),
])
def test_set_state_rejects_another_schedule(kind, tasks, seed, change):
  base = SAMPLE_TASKS if kind == 'sample' else CYCLE_TASKS
  saved = {**agd.make_schedule(kind, base, seed=0).state(), **change}
  with pytest.raises(ValueError, match='AGD schedule state'):
    agd.make_schedule(kind, tasks, seed=seed).set_state(saved)


@pytest.mark.parametrize('make,needle', [
    (lambda: Task(''), "''"),
    (lambda: Task('img', weight=0.0), "'img'"),
    (lambda: Task('vid', weight=-1.0), "'vid'"),
    (lambda: Task('aud', weight=float('nan')), "'aud'"),
    (lambda: Task('txt', weight=float('inf')), "'txt'"),
    (lambda: Task('img', interval=0), "'img'"),
    (lambda: Task('vid', interval=1.5), "'vid'"),
    (lambda: agd.make_schedule('sample', [Task('img'), Task('vid'), Task('img')]), "'img'"),
    (lambda: agd.make_schedule('sample', []), 'at least one'),
    (lambda: agd.make_schedule('shuffle', [Task('img')]), "'shuffle'"),
    (lambda: agd.cycle_period([Task('p', interval=1021), Task('q', interval=1031)]), '1021'),
])
def test_bad_specs_raise(make, needle):
  with pytest.raises(ValueError) as e:
    make()
  assert needle in str(e.value)
