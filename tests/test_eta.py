"""The η sweep: equal active FLOPs of every preset run, η interpolation and bootstrap on
synthetic power-law curves with a known answer, the separation check, resumption with an
injected runner (no training) and the report files."""

import io
import json
import os
import sys

import numpy as np
import pytest

from configs import sweeps
from training import eta, sweep

A, ALPHA = 50.0, 0.3  # synthetic dense curve: excess = A * C^-ALPHA


@pytest.fixture(scope='module')
def tiny_plan():
  return sweep.build_plan('tiny', data='')  # the configs' default dataset


@pytest.mark.parametrize('preset', sorted(p for p in sweeps.PRESETS
                                           if 'runs' not in sweeps.PRESETS[p]))
def test_every_preset_run_is_at_equal_active_flops(preset):
  plan = sweep.build_plan(preset)  # the preset's own dataset, as the sweep runs it
  assert all('data=scenes/' in r.config_arg for r in plan)
  names = {r.name for r in plan}
  assert {'moe_8x_ec', 'moma_1t1i', 'moma_4t4i', 'mod_moma_4t4i', 'mot_all', 'mot_ffn',
          'control_res_post', 'dense_wide'} <= names
  p = sweeps.PRESETS[preset]
  dense = [r for r in plan if r.kind == 'dense']
  assert sorted(r.multiplier for r in dense) == sorted(p['dense_multipliers'])
  assert {r.steps for r in plan if r.kind != 'dense'} == {p['base_steps']}
  for r in plan:
    if r.kind in ('sparse', 'control', 'dense'):
      assert abs(r.flops_ratio - 1) <= sweeps.FLOPS_TOLERANCE, (r.name, r.flops_ratio)
  assert next(r for r in plan if r.name == 'dense_wide').flops_ratio > 1.5
  # MoD skips 3/4 of half the layers: parity needs added layers.
  mod = next(r for r in plan if r.name == 'mod_moma_4t4i')
  base_layers = sweep.load_config(mod.config_arg).model.num_layers
  assert mod.overrides['model.num_layers'] > base_layers
  assert all('norm=pre' in r.config_arg for r in plan if r.config_arg.startswith(
      ('configs/moma.py', 'configs/mot.py')) and r.kind != 'control')
  assert 'norm=res_post' in next(r for r in plan if r.kind == 'control').config_arg


def test_unequal_run_is_refused():
  preset = sweep.copy_preset('tiny')
  preset['run_overrides']['moma_4t4i'] = {'model.moma.mlp_dim': 640}
  with pytest.raises(ValueError, match=r'moma_4t4i \(1\.\d+x\)'):
    sweep.build_plan(preset, data='')
  plan = sweep.build_plan(preset, data='', check=False)  # what the dry run prints
  assert not next(r for r in plan if r.name == 'moma_4t4i').flops_ok
  assert 'FAIL' in sweep.format_plan(plan, preset, 1)


def test_a_run_with_a_bad_override_is_named():
  preset = sweep.copy_preset('tiny')
  preset['run_overrides']['dense_wide'] = {'model.embed_dim': 256}  # heads x head_dim: 128
  with pytest.raises(ValueError, match='dense_wide.*model.num_heads'):
    sweep.build_plan(preset, data='')
  preset['run_overrides']['dense_wide'] = {'model.embd_dim': 256}
  with pytest.raises(ValueError, match="dense_wide.*unknown config key 'model.embd_dim'"):
    sweep.build_plan(preset, data='')


# --- η on synthetic curves ------------------------------------------------------------

C1 = 1e13  # the 1x compute point
MULTS = np.array([0.25, 0.5, 1, 2, 4])
DENSE_C = C1 * MULTS


def excess_at(c):
  return A * np.asarray(c, np.float64) ** -ALPHA


@pytest.mark.parametrize('true_eta', [0.3, 1.0, 1.7, 3.2, 3.99])
def test_interpolation_is_exact_on_a_power_law(true_eta):
  value, where = eta.interpolate_eta(DENSE_C, excess_at(DENSE_C), C1,
                                     excess_at(true_eta * C1))
  assert where == eta.INSIDE
  assert value == pytest.approx(true_eta, rel=1e-9)


@pytest.mark.parametrize('true_eta,bound,where', [(8.0, 4.0, eta.ABOVE),
                                                  (0.1, 0.25, eta.BELOW)])
def test_beyond_the_dense_range_gives_a_bound(true_eta, bound, where):
  value, w = eta.interpolate_eta(DENSE_C, excess_at(DENSE_C), C1, excess_at(true_eta * C1))
  assert (w, value) == (where, pytest.approx(bound))
  assert eta.eta_text(value, w) == ('>' if where == eta.ABOVE else '<') + f'{bound:.2f}'


def test_interpolation_takes_the_first_crossing_and_vectorises():
  c = np.array([1.0, 2.0, 4.0, 8.0])
  e = np.array([1.0, 0.5, 0.6, 0.25])  # noisy: not monotone
  value, where = eta.interpolate_eta(c, e, 1.0, 0.55)
  assert where == eta.INSIDE and 1.0 < value < 2.0  # not the later 2 -> 4 or 4 -> 8
  stacked = np.stack([excess_at(DENSE_C)] * 3)
  values, wheres = eta.interpolate_eta(DENSE_C, stacked, C1, excess_at(np.array(
      [0.5, 2.0, 9.0]) * C1))
  np.testing.assert_allclose(values, [0.5, 2.0, 4.0], rtol=1e-9)
  assert wheres.tolist() == [eta.INSIDE, eta.INSIDE, eta.ABOVE]


def _seeds(mean, n, noise, rng):
  return mean * np.exp(noise * rng.standard_normal(n))


def test_bootstrap_zero_noise_gives_zero_width():
  dense = [np.full(3, e) for e in excess_at(DENSE_C)]
  lo, hi, lo_b, hi_b = eta.bootstrap_eta(DENSE_C, dense, C1, np.full(3, excess_at(2 * C1)),
                                         samples=300)
  assert lo == pytest.approx(2.0, rel=1e-9) and hi == pytest.approx(2.0, rel=1e-9)
  assert not (lo_b or hi_b)


def test_bootstrap_interval_covers_the_truth_and_flags_bounds():
  rng = np.random.default_rng(1)
  dense = [_seeds(e, 5, 0.01, rng) for e in excess_at(DENSE_C)]
  sparse = _seeds(excess_at(2.0 * C1), 5, 0.01, rng)
  lo, hi, lo_b, hi_b = eta.bootstrap_eta(DENSE_C, dense, C1, sparse, samples=1000)
  assert lo < 2.0 < hi and hi - lo < 1.0 and not (lo_b or hi_b)
  # The same bootstrap is reproducible (fixed RNG seed).
  assert eta.bootstrap_eta(DENSE_C, dense, C1, sparse, samples=1000)[:2] == (lo, hi)
  near_top = _seeds(excess_at(3.9 * C1), 5, 0.05, rng)
  assert eta.bootstrap_eta(DENSE_C, dense, C1, near_top, samples=1000)[3]  # hi is a bound


def test_separation_check():
  # Squares about each group's mean: 2e-4 (1 dof) and 8/3e-4 (2 dof).
  sd = eta.pooled_sd([[1.0, 1.02], [2.0, 1.98, 2.0], [5.0]])
  assert sd == pytest.approx(np.sqrt((2e-4 + 8 / 3 * 1e-4) / 3), rel=1e-9)
  assert eta.pooled_sd([[1.0], [2.0]]) is None
  assert eta.compare([1.0, 1.01], [0.9, 0.91], 0.005)['verdict'] == 'lower'
  assert eta.compare([1.0, 1.01], [0.99, 1.0], 0.005)['verdict'] == 'within noise'
  assert eta.compare([1.0, 1.01], [1.2, 1.21], 0.005)['verdict'] == 'higher'
  assert eta.compare([1.0], [0.5], None)['verdict'] == 'unknown'


# --- the sweep with a fake runner -----------------------------------------------------

TRUE_ETA = {'moma_4t4i': 2.0, 'moe_8x_ec': 1.5, 'moma_1t1i': 1.2, 'mod_moma_4t4i': 3.0,
            'mot_all': 1.4, 'mot_ffn': 1.3, 'control_res_post': 0.8, 'dense_wide': 1.0}


class FakeRunner:
  """Stands in for train.py / eval.py: train writes metrics.jsonl, eval writes eval.json
  whose excess follows a power law in training FLOPs (sparse runs at TRUE_ETA x their
  FLOPs; seed noise makes seeds differ). Raises KeyboardInterrupt at call `stop_at`;
  `fail` names runs whose training exits 1."""

  def __init__(self, plan, *, stop_at=None, fail=(), key='excess', noise=0.002,
               true_eta=None):
    self.by_name = {r.name: r for r in plan}
    self.calls, self.stop_at, self.fail, self.key, self.noise = [], stop_at, fail, key, noise
    self.true_eta = TRUE_ETA if true_eta is None else true_eta

  def __call__(self, argv, log_path, progress):
    if self.stop_at is not None and len(self.calls) == self.stop_at:
      raise KeyboardInterrupt
    script = os.path.basename(argv[1])
    wd = next(a.split('=', 1)[1] for a in argv if a.startswith('--workdir='))
    name, seed = os.path.basename(os.path.dirname(wd)), int(os.path.basename(wd)[4:])
    self.calls.append((script, name, seed))
    run = self.by_name[name]
    assert f'--config.seed={seed}' in argv and f'--config.total_steps={run.steps}' in argv
    if script == 'train.py':
      progress(f'step {run.steps}/{run.steps} | loss 1.0')
      if name in self.fail:
        return 1
      speed = 1000.0 / (2 if name == 'moma_4t4i' else 1)
      with open(os.path.join(wd, 'metrics.jsonl'), 'w') as f:
        f.write(json.dumps({'step': run.steps, 'perf/tokens_per_s': speed}) + '\n')
      return 0
    if run.kind == 'capacity':  # 10% better than dense at the same tokens
      e = 0.9 * excess_at(run.train_flops / run.flops_ratio)
    else:
      e = excess_at(run.train_flops * (1.0 if run.kind == 'dense' else self.true_eta[name]))
    e *= 1 + self.noise * (1 if seed % 2 else -1)
    mods = {m: {'loss': e + 1.0, 'tokens': 100 if m == 'text' else 300,
                **({self.key: e} if self.key == 'excess' else {})}
            for m in ('text', 'image')}
    with open(os.path.join(wd, 'eval.json'), 'w') as f:
      json.dump({'step': run.steps, 'modalities': mods}, f)
    return 0


def _quiet():
  return sweep.Progress(io.StringIO())


def test_sweep_resumes_without_repeating_completed_runs(tiny_plan, tmp_path):
  out = str(tmp_path)
  first = FakeRunner(tiny_plan, stop_at=9)  # interrupted before the 5th run's eval
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(tiny_plan, out, 2, runner=first, progress=_quiet())
  done_first = {(n, s) for script, n, s in first.calls if script == 'eval.py'}
  assert len(done_first) == 4
  assert [n for _, n, _ in first.calls[::2]] == [r.name for r in tiny_plan[:5]]
  second = FakeRunner(tiny_plan, fail=('mot_ffn',))
  result = sweep.run_sweep(tiny_plan, out, 2, runner=second, progress=_quiet())
  assert not done_first & {(n, s) for _, n, s in second.calls}
  assert set(result['skipped']) == done_first
  assert [(n, s) for n, s, _ in result['failed']] == [('mot_ffn', 0), ('mot_ffn', 1)]
  assert 'train.py exited with 1' in result['failed'][0][2]
  seeds_in_order = [s for _, _, s in second.calls]
  assert seeds_in_order == sorted(seeds_in_order)  # seed-major
  third = FakeRunner(tiny_plan)
  result = sweep.run_sweep(tiny_plan, out, 2, runner=third, progress=_quiet())
  assert {n for _, n, _ in third.calls} == {'mot_ffn'} and not result['failed']
  assert all(sweep.is_complete(r.workdir(out, s), r.steps) for r in tiny_plan
             for s in range(2))
  # A run directory made with other settings is neither skipped as done nor reported.
  changed = next(r for r in tiny_plan if r.name == 'moma_1t1i')
  with open(os.path.join(changed.workdir(out, 1), sweep.RUN_FILE), 'w') as f:
    json.dump({**changed.identity(), 'overrides': {'learning_rate': 1.0}}, f)
  result = sweep.run_sweep(tiny_plan, out, 2, runner=FakeRunner(tiny_plan),
                           progress=_quiet())
  assert [(n, s) for n, s, _ in result['failed']] == [('moma_1t1i', 1)]
  assert 'other settings (overrides' in result['failed'][0][2]
  report = eta.report([r.as_dict() for r in tiny_plan], out, samples=50)
  assert report['runs']['moma_1t1i']['seeds'] == [0]
  assert any('moma_1t1i/seed1 was trained with other overrides' in w
             for w in report['warnings'])


def test_report_recovers_the_known_eta(tiny_plan, tmp_path):
  out = str(tmp_path)
  sweep.run_sweep(tiny_plan, out, 2, runner=FakeRunner(tiny_plan), progress=_quiet())
  sweep.estimate_times(tiny_plan, 'tiny', out)  # measured tokens/s now
  assert next(r for r in tiny_plan if r.name == 'moma_4t4i').est_source == 'measured'
  result = eta.report([r.as_dict() for r in tiny_plan], out, title='test', samples=200)
  assert set(json.load(open(os.path.join(out, 'eta.json')))) >= {
      'metric', 'dense', 'runs', 'dense_improving', 'capacity', 'seed_noise_sd',
      'missing', 'warnings'}
  assert result['metric'] == 'excess' and not result['warnings'] and not result['missing']
  for name, true in TRUE_ETA.items():
    r = result['runs'][name]
    if r['kind'] == 'capacity':
      assert not r['eta']
      continue
    for p in eta.PANELS:
      assert r['eta'][p]['value'] == pytest.approx(true, rel=1e-6), (name, p)
  moma = result['runs']['moma_4t4i']
  assert moma['step_time_ratio'] == pytest.approx(2.0)
  assert moma['eta']['overall']['wall_clock'] == pytest.approx(1.0, rel=1e-6)
  assert moma['vs_dense_1x']['overall']['verdict'] == 'lower'
  assert result['dense_improving']['overall']['all']
  assert result['capacity']['capacity_limited'] is True
  # 10% less excess than dense 1x is worth 0.9^(-1/alpha) x its compute on the power law
  worth = result['capacity']['worth_in_dense_compute']
  for p in eta.PANELS:
    assert worth[p]['value'] == pytest.approx(0.9 ** (-1 / ALPHA), rel=1e-6), p
  md = open(os.path.join(out, 'eta.md')).read()
  assert '| run | FLOPs/token ÷ dense |' in md and '| moma_4t4i | 1.00' in md
  assert 'Norm control' in md and 'Capacity check' in md
  assert os.path.getsize(os.path.join(out, 'eta.png')) > 10_000
  # A step-time ratio measured in one benchmark run replaces the training logs' tokens/s.
  with open(os.path.join(out, 'step_times.json'), 'w') as f:
    json.dump({'reference': 'dense_1x', 'step_time_ratio': {'moma_4t4i': 1.25}}, f)
  result = eta.report([r.as_dict() for r in tiny_plan], out, title='test', samples=50)
  moma = result['runs']['moma_4t4i']
  assert moma['step_time_ratio'] == 1.25
  assert moma['step_time_source'] == 'benchmarks/sweep_steps.py'
  assert moma['eta']['overall']['wall_clock'] == pytest.approx(TRUE_ETA['moma_4t4i'] / 1.25)
  assert result['runs']['mot_all']['step_time_source'] == 'training tokens/s'


def test_report_falls_back_to_loss_and_flags_unseparated_curves(tiny_plan, tmp_path):
  out = str(tmp_path)
  part = [r for r in tiny_plan if r.name in ('dense_1x', 'dense_2x', 'moma_4t4i')]
  runner = FakeRunner(part, key='loss', noise=0.3)  # loss only; noise >> the curve's step
  sweep.run_sweep(part, out, 2, runner=runner, progress=_quiet())
  result = eta.report([r.as_dict() for r in tiny_plan], out, samples=100)
  assert result['metric'] == 'loss' and 'excess' in result['warnings'][0]
  assert not result['dense_improving']['overall']['all']
  assert result['runs']['moma_4t4i']['vs_dense_1x']['overall']['verdict'] == 'within noise'
  assert 'dense_4x' in result['missing']
  assert 'no `excess`' in open(os.path.join(out, 'eta.md')).read()


def test_seeds_trained_apart_merge_into_the_report_of_one_sweep(tiny_plan, tmp_path):
  part = [r for r in tiny_plan if r.name in ('dense_0.5x', 'dense_1x', 'dense_2x',
                                             'moma_4t4i', 'mot_all')]
  plan = [r.as_dict() for r in part]
  both, a, b = (str(tmp_path / d) for d in ('both', 'a', 'b'))
  sweep.run_sweep(part, both, 2, runner=FakeRunner(part), progress=_quiet())
  runner = FakeRunner(part)
  sweep.run_sweep(part, a, 2, runner=runner, only_seeds={0}, progress=_quiet())
  assert {s for _, _, s in runner.calls} == {0}
  runner = FakeRunner(part)
  sweep.run_sweep(part, b, 2, runner=runner, only={'dense_1x', 'moma_4t4i', 'mot_all'},
                  only_seeds={1}, progress=_quiet())
  assert {(n, s) for _, n, s in runner.calls} == {('dense_1x', 1), ('moma_4t4i', 1),
                                                  ('mot_all', 1)}
  eta.report(plan, a, samples=50)
  want = eta.report(plan, both, samples=50)
  got = eta.report(plan, b, samples=50, merge=[os.path.join(a, 'eta.json')])
  assert got['merged'] == {os.path.join(a, 'eta.json'): {
      'dense_0.5x': [0], 'dense_1x': [0], 'dense_2x': [0], 'moma_4t4i': [0], 'mot_all': [0]}}
  assert got['runs']['moma_4t4i']['seeds'] == [0, 1] and not got['warnings']
  assert got['dense'][1]['seeds'] == [0, 1] and got['dense'][0]['seeds'] == [0]
  for name in ('moma_4t4i', 'mot_all'):  # the 1x point and both sparse runs: as one sweep
    assert got['runs'][name]['excess'] == want['runs'][name]['excess']
  assert got['dense'][1]['excess'] == want['dense'][1]['excess']
  pairs = [want['runs'][n]['excess'] for n in ('moma_4t4i', 'mot_all')] + [
      want['dense'][1]['excess']]  # the runs with both seeds in the merged report
  for p in eta.PANELS:
    assert got['seed_noise_sd'][p] == pytest.approx(eta.pooled_sd(e[p]['values']
                                                                  for e in pairs))
  assert 'Seeds merged from' in open(os.path.join(b, 'eta.md')).read()
  # A seed OUT has wins; a report of other settings or another metric is not merged.
  again = eta.report(plan, both, samples=50, merge=[os.path.join(a, 'eta.json')])
  assert again['merged'] == {} and again['runs'] == want['runs']
  other = json.load(open(os.path.join(a, 'eta.json')))
  other['dense'][1]['steps'] += 1
  other['runs']['mot_all']['overrides'] = {'learning_rate': 1.0}
  path = str(tmp_path / 'other.json')
  json.dump(other, open(path, 'w'))
  got = eta.report(plan, b, samples=50, merge=[path])
  assert got['runs']['mot_all']['seeds'] == [1] and got['dense'][1]['seeds'] == [1]
  assert sum('other steps' in w or 'other overrides' in w for w in got['warnings']) == 2
  json.dump({**other, 'metric': 'loss'}, open(path, 'w'))
  assert any('measures `loss`' in w for w in eta.report(plan, b, samples=50,
                                                         merge=[path])['warnings'])
  open(path, 'w').write('{"dense": []')
  with pytest.raises(ValueError, match='other.json is not a readable eta.json'):
    eta.read_report(path)


def test_subprocess_runner_logs_and_reports_progress(tmp_path):
  seen = []
  log = str(tmp_path / 'train.log')
  code = "import sys; print('I0 loop.py] step 5/10 | loss 1.0'); sys.exit(3)"
  assert sweep.subprocess_runner([sys.executable, '-c', code], log, seen.append) == 3
  assert seen == ['step 5/10 | loss 1.0'] and 'step 5/10' in open(log).read()


def test_interrupting_the_runner_lets_the_child_checkpoint(tmp_path):
  """Ctrl-C in the sweep (here: raised from the progress callback) sends the child SIGTERM
  and waits for it, as train.py needs to save its checkpoint."""
  saved = tmp_path / 'saved'
  code = (f"import signal, sys, time\n"
          f"def save(*_):\n  open({str(saved)!r}, 'w').write('ok'); sys.exit(0)\n"
          f"signal.signal(signal.SIGTERM, save)\n"
          f"print('step 1/9', flush=True)\ntime.sleep(30)\n")

  def interrupt(line):
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    sweep.subprocess_runner([sys.executable, '-c', code], str(tmp_path / 'log'), interrupt)
  assert saved.read_text() == 'ok'


# --- Mixture-of-Mamba against a dense-Mamba curve (preset `mamba_tiny`) ----------------

MAMBA_ETA = {'mom_all': 1.6, 'mom_in_out': 1.25}


def test_the_mamba_preset_plans_mixture_of_mamba_against_dense_mamba():
  plan = sweep.build_plan('mamba_tiny')  # its own dataset, as the sweep runs it
  p = sweeps.PRESETS['mamba_tiny']
  dense = [r for r in plan if r.kind == 'dense']
  assert sorted(r.multiplier for r in dense) == sorted(p['dense_multipliers'])
  assert {r.config_arg for r in dense} == {'configs/mamba.py:tiny,data=scenes/g3_k128'}
  assert [r.name for r in plan if r.kind != 'dense'] == ['mom_all', 'mom_in_out']
  assert plan[-1].name == 'mamba_4x'  # the late dense point, as in `tiny`
  for r in plan:
    assert sweep.load_config(r.config_arg).model.family == 'mamba'
    assert r.flops_ok and abs(r.flops_ratio - 1) <= sweeps.FLOPS_TOLERANCE, r.name
  mom = next(r for r in plan if r.name == 'mom_all')
  assert sweep.load_config(mom.config_arg).model.mamba.untie == 'all'
  assert mom.params > mom.active_params == dense[0].active_params  # untied, same per token
  in_out = next(r for r in plan if r.name == 'mom_in_out')
  assert sweep.load_config(in_out.config_arg).model.mamba.untie == 'in,out'
  assert mom.params > in_out.params > dense[0].params
  text = sweep.format_plan(plan, 'mamba_tiny', 2)
  assert 'FAIL' not in text and 'mom_in_out' in text and 'mamba_1x' in text
  # The transformer presets keep their runs.
  assert [r.name for r in sweep.build_plan('tiny', data='')][:2] == ['dense_0.25x',
                                                                     'dense_0.5x']


def test_the_mamba_sweep_runs_resumes_and_reports_eta_against_dense_mamba(tmp_path):
  plan = sweep.build_plan('mamba_tiny', data='')
  out = str(tmp_path)
  first = FakeRunner(plan, stop_at=4, true_eta=MAMBA_ETA)  # 2 runs complete
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(plan, out, 2, runner=first, progress=_quiet())
  runner = FakeRunner(plan, true_eta=MAMBA_ETA)
  result = sweep.run_sweep(plan, out, 2, runner=runner, progress=_quiet())
  assert len(result['skipped']) == 2 and not result['failed']
  assert len(result['done']) == 2 * len(plan) - 2
  assert all('configs/mamba.py:tiny' in next(a for a in argv if a.startswith('--config='))
             for argv in [r.argv('train.py', out, 0) for r in plan])
  report = eta.report([r.as_dict() for r in plan], out, title='mamba', samples=100)
  assert [d['name'] for d in report['dense']] == [f'mamba_{m:g}x' for m in
                                                  sweeps.PRESETS['mamba_tiny'][
                                                      'dense_multipliers']]
  assert not report['missing'] and report['capacity'] is None
  for name, true in MAMBA_ETA.items():
    for panel in eta.PANELS:
      assert report['runs'][name]['eta'][panel]['value'] == pytest.approx(true, rel=1e-6)
