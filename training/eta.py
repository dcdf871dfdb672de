"""η from a sweep's runs: how many times the training FLOPs a dense model needs to reach a
sparse model's eval excess loss (numpy + matplotlib; no jax). docs/eta.md.

Per modality (and "overall": the token-weighted mean over modalities, like the MoMa paper's
column), with e = eval `excess` (loss above the dataset's Bayes floor; `loss` if absent):

  dense curve   (C_i, mean over seeds of e at C_i), C_i = training FLOPs of dense_<m>x
  η             C_dense(e_sparse) / C_sparse, C_dense read off the dense curve by linear
                interpolation in (log C, log e) at the FIRST compute where the curve reaches
                e_sparse; outside the curve a bound: η >= C_max / C_sparse when no dense
                point is as good, η <= C_min / C_sparse when the smallest already is
  interval      bootstrap over seeds: each run's seeds resampled with replacement (fixed
                RNG seed), η recomputed; the 2.5 / 97.5 percentiles
  separation    seed noise = pooled sd over seeds of every run with >= 2 seeds; two means
                differ "beyond noise" when |a - b| > 2 sd sqrt(1/n_a + 1/n_b). Checked: each
                step of the dense curve (still improving with compute?) and each run vs
                dense 1x (at equal compute)
  wall-clock η  η / (sparse step time / dense step time): the ratio measured in one run by
                benchmarks/sweep_steps.py (OUT/step_times.json) when it exists, else from
                the median `perf/tokens_per_s` in each run's metrics.jsonl

`report(plan, out)` reads OUT/<run>/seed<k>/{eval.json, metrics.jsonl} of every complete run
and writes OUT/eta.json, OUT/eta.md and OUT/eta.png; `merge=` adds the per-seed results of
earlier reports of the same plan (another machine's seeds, a session whose workdirs are gone).
"""

from __future__ import annotations

import glob
import json
import os
import statistics

import numpy as np

from training import metrics

MODALITIES = ('text', 'image')
PANELS = MODALITIES + ('overall',)
NOISE_Z = 2.0  # "beyond seed noise": more than this many standard errors apart
BELOW, INSIDE, ABOVE = -1, 0, 1  # where η falls against the dense range


# ---------------------------------------------------------------------------------------
# The numbers


def interpolate_eta(dense_c, dense_e, sparse_c, sparse_e):
  """η of sparse points against dense curves, vectorised over leading axes.

  dense_c [P] increasing training FLOPs; dense_e [..., P] excess at them; sparse_c scalar;
  sparse_e [...]. Returns (η [...], where [...]): where = INSIDE (interpolated), ABOVE (no
  dense point reaches e: η >= C_max / C_sparse, the value returned) or BELOW (the smallest
  dense run already does: η <= C_min / C_sparse, returned).
  """
  c = np.log(np.asarray(dense_c, np.float64))
  e = np.log(np.maximum(np.asarray(dense_e, np.float64), 1e-12))
  target = np.log(np.maximum(np.asarray(sparse_e, np.float64), 1e-12))[..., None]
  reached = e <= target
  first = np.argmax(reached, axis=-1)
  anywhere = reached.any(axis=-1)
  j = np.clip(first, 1, len(c) - 1)
  e0 = np.take_along_axis(e, (j - 1)[..., None], -1)[..., 0]
  e1 = np.take_along_axis(e, j[..., None], -1)[..., 0]
  t = target[..., 0]
  with np.errstate(divide='ignore', invalid='ignore'):
    frac = np.where(e1 != e0, (t - e0) / (e1 - e0), 0.0)
  log_cd = c[j - 1] + frac * (c[j] - c[j - 1])
  where = np.where(~anywhere, ABOVE, np.where(first == 0, BELOW, INSIDE))
  log_cd = np.where(where == ABOVE, c[-1], np.where(where == BELOW, c[0], log_cd))
  return np.exp(log_cd) / sparse_c, where


def bootstrap_eta(dense_c, dense_seeds, sparse_c, sparse_seeds, *, samples=2000, seed=0):
  """95% interval of η over seeds. dense_seeds: one array of per-seed excess per dense
  point; sparse_seeds: the sparse run's. Each replicate resamples every run's seeds with
  replacement. Returns (lo, hi, lo_is_bound, hi_is_bound): a limit is a bound when over
  2.5% of the replicates fell outside the dense range on that side."""
  rng = np.random.default_rng(seed)

  def means(values):
    values = np.asarray(values, np.float64)
    idx = rng.integers(0, len(values), size=(samples, len(values)))
    return values[idx].mean(axis=1)

  dense = np.stack([means(v) for v in dense_seeds], axis=-1)  # [S, P]
  eta, where = interpolate_eta(dense_c, dense, sparse_c, means(sparse_seeds))
  lo, hi = np.percentile(eta, [2.5, 97.5])
  return (float(lo), float(hi), bool(np.mean(where == BELOW) > 0.025),
          bool(np.mean(where == ABOVE) > 0.025))


def pooled_sd(groups) -> float | None:
  """Pooled standard deviation over groups (seeds of one run each) with >= 2 values."""
  num = den = 0.0
  for g in groups:
    g = np.asarray(g, np.float64)
    if len(g) >= 2:
      num += ((g - g.mean()) ** 2).sum()
      den += len(g) - 1
  return float(np.sqrt(num / den)) if den else None


def compare(a, b, sd: float | None) -> dict:
  """Mean of b minus mean of a against seed noise: verdict 'lower' | 'higher' | 'within
  noise' | 'unknown' (no noise estimate)."""
  diff = float(np.mean(b) - np.mean(a))
  if sd is None:
    return {'diff': diff, 'threshold': None, 'verdict': 'unknown'}
  thr = NOISE_Z * sd * float(np.sqrt(1 / len(a) + 1 / len(b)))
  verdict = 'lower' if diff < -thr else 'higher' if diff > thr else 'within noise'
  return {'diff': diff, 'threshold': thr, 'verdict': verdict}


def eta_text(value, where) -> str:
  if value is None:
    return '-'
  v = f'{value:.2f}' if value < 10 else f'{value:.1f}'
  return {ABOVE: '>', BELOW: '<'}.get(int(where), '') + v


def interval_text(ci) -> str:
  if not ci:
    return ''
  lo, hi, lo_b, hi_b = ci
  if np.isclose(lo, hi):  # one seed everywhere, or no seed noise: nothing to show
    return ''
  return f" [{'<' if lo_b else ''}{lo:.2f}, {'>' if hi_b else ''}{hi:.2f}]"


# ---------------------------------------------------------------------------------------
# Reading a sweep


def load_runs(plan: list[dict], out: str) -> tuple[dict, list[str]]:
  """{run name: {'seeds': [k], modality/overall: [per-seed e], 'tokens_per_s'}} for runs
  with complete seeds (eval.json at the run's final step), and warnings."""
  runs, warnings, evals = {}, [], {}
  for r in plan:
    for wd in sorted(glob.glob(os.path.join(out, r['name'], 'seed*'))):
      path = os.path.join(wd, 'eval.json')
      if not os.path.exists(path):
        continue
      with open(path) as f:
        report = json.load(f)
      if report.get('step') != r['steps']:
        continue
      mismatch = _other_run(wd, r)
      if mismatch:
        warnings.append(f'{wd} was trained with other {mismatch} than the plan: skipped')
        continue
      evals.setdefault(r['name'], []).append((wd, report))
  have_excess = all('excess' in m for reps in evals.values() for _, rep in reps
                    for m in rep['modalities'].values())
  key = 'excess' if have_excess else 'loss'
  if evals and not have_excess:
    warnings.append('eval.json has no `excess` (loss above the Bayes floor) in some runs: '
                    'η is computed on the raw eval `loss`, which mixes in the floor; '
                    're-evaluate with an eval.py that writes `excess`')
  for name, reps in evals.items():
    entry = {'seeds': [], 'tokens_per_s': None, **{p: [] for p in PANELS}}
    speeds = []
    for wd, rep in reps:
      mods = rep['modalities']
      if any(m not in mods for m in MODALITIES):
        warnings.append(f'{wd}/eval.json lacks a modality of {MODALITIES}: skipped')
        continue
      entry['seeds'].append(int(os.path.basename(wd).removeprefix('seed')))
      for m in MODALITIES:
        entry[m].append(float(mods[m][key]))
      tokens = np.array([mods[m]['tokens'] for m in MODALITIES], np.float64)
      entry['overall'].append(float(np.dot(tokens, [mods[m][key] for m in MODALITIES])
                                    / tokens.sum()))
      speeds += _tokens_per_s(wd)
    if entry['seeds']:
      entry['tokens_per_s'] = statistics.median(speeds) if speeds else None
      runs[name] = entry
  return {'metric': key, 'runs': runs}, warnings


def read_report(path: str) -> dict:
  """An eta.json written by report(); ValueError naming the path if it is not one."""
  try:
    with open(path) as f:
      rep = json.load(f)
    for d in [*rep['dense'], *rep['runs'].values()]:
      if not all(len(d['excess'][p]['values']) == len(d['seeds']) for p in PANELS):
        raise ValueError('seeds and values differ in length')
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f'{path} is not a readable eta.json ({type(e).__name__}: {e})') from e
  return rep


def merge_reports(loaded: dict, plan: list[dict], paths) -> list[str]:
  """Adds to load_runs()'s result the seeds of earlier reports (eta.json files) that OUT
  lacks; a run merges only where the report's steps, training FLOPs, config and overrides
  (those it records) equal the plan's. Records {path: {run: [seeds]}} in loaded['merged'];
  returns warnings. Raises ValueError for a path that is not a readable eta.json."""
  warnings, by_name = [], {r['name']: r for r in plan}
  loaded.setdefault('merged', {})
  for path in paths:
    rep = read_report(path)
    entries = [(d['name'], d) for d in rep['dense']] + list(rep['runs'].items())
    if rep.get('metric') != loaded['metric']:
      warnings.append(f"{path} measures `{rep.get('metric')}`, this sweep "
                      f"`{loaded['metric']}`: not merged")
      continue
    for name, e in entries:
      r = by_name.get(name)
      if r is None:
        warnings.append(f'{path}: {name} is not a run of the plan: not merged')
        continue
      want = {'steps': r['steps'], 'train_flops': r['train_flops'],
              'config': r['config_arg'], 'overrides': r['overrides']}
      differ = [k for k, v in want.items() if k in e and (
          not np.isclose(e[k], v, rtol=1e-9) if k == 'train_flops'
          else json.dumps(e[k], sort_keys=True) != json.dumps(v, sort_keys=True))]
      if differ:
        warnings.append(f"{path}: {name} was trained with other {', '.join(differ)} than "
                        'the plan: not merged')
        continue
      entry = loaded['runs'].setdefault(
          name, {'seeds': [], 'tokens_per_s': None, **{p: [] for p in PANELS}})
      new = [(k, i) for i, k in enumerate(e['seeds']) if k not in entry['seeds']]
      if not new:
        continue
      rows = sorted([(k, [entry[p][j] for p in PANELS]) for j, k in enumerate(entry['seeds'])]
                    + [(k, [e['excess'][p]['values'][i] for p in PANELS]) for k, i in new])
      entry['seeds'] = [k for k, _ in rows]
      for j, p in enumerate(PANELS):
        entry[p] = [float(v[j]) for _, v in rows]
      loaded['merged'].setdefault(path, {})[name] = [k for k, _ in new]
  return warnings


def _other_run(workdir: str, run: dict) -> str | None:
  """The keys of WORKDIR/run.json (written by training/sweep.py) that differ from the
  plan's run, or None."""
  path = os.path.join(workdir, 'run.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  differ = [k for k in ('config_arg', 'overrides', 'steps', 'warmup_steps')
            if k in run and json.dumps(saved.get(k), sort_keys=True)
            != json.dumps(run[k], sort_keys=True)]
  return ', '.join(differ) or None


def _tokens_per_s(workdir: str) -> list[float]:
  return [float(r['perf/tokens_per_s']) for r in metrics.read_metrics(workdir)
          if 'perf/tokens_per_s' in r]


def _stats(values) -> dict:
  v = np.asarray(values, np.float64)
  return {'mean': float(v.mean()), 'sd': float(v.std(ddof=1)) if len(v) > 1 else None,
          'n': len(v), 'values': v.tolist()}


def analyse(plan: list[dict], loaded: dict, *, samples: int = 2000,
            step_times: dict | None = None) -> dict:
  """Everything eta.json holds, from the plan (PlannedRun.as_dict()s) and load_runs();
  `step_times`: {run: step time / dense step time} measured in one benchmark run."""
  runs = loaded['runs']
  dense = sorted((r for r in plan if r['kind'] == 'dense' and r['name'] in runs),
                 key=lambda r: r['train_flops'])
  ref = next((r for r in dense if r['multiplier'] == 1), None)
  ref_fpt = (ref or next((r for r in plan if r['kind'] == 'dense'), {})).get(
      'flops_per_token')
  sd = {p: pooled_sd(v[p] for v in runs.values()) for p in PANELS}
  result = {'metric': loaded['metric'], 'seed_noise_sd': sd, 'dense': [], 'runs': {},
            'dense_improving': {}, 'capacity': None,
            'missing': [r['name'] for r in plan if r['name'] not in runs]}
  for r in dense:
    result['dense'].append({'name': r['name'], 'multiplier': r['multiplier'],
                            'steps': r['steps'], 'train_flops': r['train_flops'],
                            'seeds': runs[r['name']]['seeds'],
                            'excess': {p: _stats(runs[r['name']][p]) for p in PANELS}})
  for p in PANELS:
    steps = []
    for a, b in zip(dense, dense[1:]):
      cmp = compare(runs[a['name']][p], runs[b['name']][p], sd[p])
      steps.append({'from': a['name'], 'to': b['name'], **cmp,
                    'improving': cmp['verdict'] == 'lower'})
    known = bool(steps) and all(s['verdict'] != 'unknown' for s in steps)
    result['dense_improving'][p] = {  # all: None = no noise estimate (one seed) or < 2 points
        'steps': steps, 'all': all(s['improving'] for s in steps) if known else None}
  dense_speed = (runs[ref['name']]['tokens_per_s'] if ref else None) or next(
      (runs[r['name']]['tokens_per_s'] for r in dense if runs[r['name']]['tokens_per_s']),
      None)
  dense_c = np.array([r['train_flops'] for r in dense])
  for r in plan:
    if r['kind'] == 'dense' or r['name'] not in runs:
      continue
    v = runs[r['name']]
    entry = {'kind': r['kind'], 'config': r['config_arg'], 'overrides': r['overrides'],
             'flops_per_token': r['flops_per_token'],
             'flops_ratio': r['flops_per_token'] / ref_fpt if ref_fpt else None,
             'params': r['params'], 'active_params': r['active_params'],
             'train_flops': r['train_flops'], 'seeds': v['seeds'],
             'excess': {p: _stats(v[p]) for p in PANELS}, 'eta': {}, 'vs_dense_1x': {},
             'step_time_ratio': None}
    if step_times and r['name'] in step_times:
      entry['step_time_ratio'] = step_times[r['name']]
      entry['step_time_source'] = 'benchmarks/sweep_steps.py'
    elif v['tokens_per_s'] and dense_speed:
      entry['step_time_ratio'] = dense_speed / v['tokens_per_s']
      entry['step_time_source'] = 'training tokens/s'
    for p in PANELS:
      if ref:
        entry['vs_dense_1x'][p] = compare(runs[ref['name']][p], v[p], sd[p])
      if len(dense) < 2 or r['kind'] == 'capacity':
        continue
      dense_means = np.array([np.mean(runs[d['name']][p]) for d in dense])
      eta, where = interpolate_eta(dense_c, dense_means, r['train_flops'], np.mean(v[p]))
      ci = bootstrap_eta(dense_c, [runs[d['name']][p] for d in dense], r['train_flops'],
                         v[p], samples=samples)
      ratio = entry['step_time_ratio']
      entry['eta'][p] = {
          'value': float(eta), 'where': int(where), 'text': eta_text(float(eta), int(where)),
          'interval': list(ci),
          'wall_clock': float(eta) / ratio if ratio else None,
          'wall_clock_interval': [ci[0] / ratio, ci[1] / ratio] if ratio else None}
    result['runs'][r['name']] = entry
  cap = next((r for r in plan if r['kind'] == 'capacity' and r['name'] in runs), None)
  if cap and ref:
    cmp = {p: compare(runs[ref['name']][p], runs[cap['name']][p], sd[p]) for p in PANELS}
    verdict = cmp['overall']['verdict']
    result['capacity'] = {
        'wide': cap['name'], 'reference': ref['name'], 'compare': cmp,
        'capacity_limited': verdict == 'lower',
        'text': {'lower': f"{cap['name']} beats {ref['name']} at equal tokens beyond seed "
                          f"noise: the dense model is capacity-limited",
                 'higher': f"{cap['name']} is worse than {ref['name']} at equal tokens "
                           f"beyond seed noise (undertrained or mistuned wide model?)",
                 'within noise': f"{cap['name']} is within seed noise of {ref['name']} at "
                                 f"equal tokens: no sign that the dense model is "
                                 f"capacity-limited",
                 'unknown': 'one seed per run: no noise estimate for the capacity check'}[
                     verdict]}
    if len(dense) >= 2:
      # What the wide model's extra parameters are worth in dense training compute: its
      # excess read off the dense curve, over dense 1x's FLOPs (not its own: it spends more
      # per token). A sparse model whose extra parameters helped as much would reach this η.
      worth = {}
      for p in PANELS:
        dense_means = np.array([np.mean(runs[d['name']][p]) for d in dense])
        value, where = interpolate_eta(dense_c, dense_means, ref['train_flops'],
                                       np.mean(runs[cap['name']][p]))
        worth[p] = {'value': float(value), 'where': int(where),
                    'text': eta_text(float(value), int(where))}
      result['capacity']['worth_in_dense_compute'] = worth
  return result


# ---------------------------------------------------------------------------------------
# Writing the report


def _mean_sd(stats: dict) -> str:
  sd = f" ± {stats['sd']:.4f}" if stats['sd'] is not None else ''
  return f"{stats['mean']:.4f}{sd}"


_VERDICT = {'lower': 'better beyond noise', 'higher': 'worse beyond noise',
            'within noise': 'within noise', 'unknown': '1 seed: unknown'}


def markdown(result: dict, title: str) -> str:
  metric = result['metric']
  lines = [f'# η: {title}', '',
           f"Metric: eval `{metric}` per token"
           + (' (loss above the Bayes floor)' if metric == 'excess' else
              ' (**no `excess` in eval.json: raw loss, floor included**)')
           + '. η = training FLOPs dense needs for the run\'s excess ÷ the run\'s training '
             'FLOPs (log-log interpolation on the dense curve; [95% bootstrap interval over '
             'seeds]; ">x" / "<x": beyond the dense range). Wall-clock η = η ÷ (step time '
             '÷ dense step time).', '']
  sd = result['seed_noise_sd']
  lines.append('Seed noise (pooled sd): ' + ', '.join(
      f'{p} {sd[p]:.4f}' if sd[p] is not None else f'{p} unknown' for p in PANELS) + '.')
  parts = []
  for p in PANELS:
    d = result['dense_improving'][p]
    flat = [f"{s['from']}→{s['to']}" for s in d['steps'] if s['verdict'] not in (
        'lower', 'unknown')]
    state = {True: 'yes', False: 'no', None: 'unknown'}[d['all']]
    parts.append(f"{p}: " + (state if d['steps'] else 'n/a')
                 + (f" (not beyond noise: {', '.join(flat)})" if flat else ''))
  lines += ['Dense still improving with compute at every step of the curve: '
            + '; '.join(parts) + '.', '']
  lines += ['| dense run | steps | training FLOPs | seeds | ' + ' | '.join(
      f'{metric} {p}' for p in PANELS) + ' |', '|---' * (4 + len(PANELS)) + '|']
  for d in result['dense']:
    lines.append(f"| {d['name']} | {d['steps']} | {d['train_flops']:.3e} | "
                 f"{len(d['seeds'])} | " + ' | '.join(_mean_sd(d['excess'][p])
                                                      for p in PANELS) + ' |')
  lines += ['', '| run | FLOPs/token ÷ dense | params (active) | ' + ' | '.join(
      f'{metric} {m} at 1×' for m in MODALITIES) + ' | η text | η image | η overall | '
      'step time ÷ dense | wall-clock η overall | overall vs dense 1× |',
      '|---' * 11 + '|']
  for name, r in result['runs'].items():
    eta = lambda p: (r['eta'][p]['text'] + interval_text(r['eta'][p]['interval'])
                     if p in r['eta'] else '-')
    ov = r['eta'].get('overall', {})
    wall = (eta_text(ov['wall_clock'], ov['where']) + interval_text(
        [*ov['wall_clock_interval'], *ov['interval'][2:]]) if ov.get('wall_clock') else '-')
    ratio = f"{r['flops_ratio']:.4f}" if r['flops_ratio'] else '-'
    step = f"{r['step_time_ratio']:.2f}" if r['step_time_ratio'] else '-'
    vs = r['vs_dense_1x'].get('overall')
    label = name + {'control': ' (norm control)', 'capacity': ' (wider dense)'}.get(
        r['kind'], '')
    lines.append(f"| {label} | {ratio} | {r['params'] / 1e6:.2f}M "
                 f"({r['active_params'] / 1e6:.2f}M) | "
                 + ' | '.join(_mean_sd(r['excess'][m]) for m in MODALITIES)
                 + f" | {eta('text')} | {eta('image')} | {eta('overall')} | {step} | {wall}"
                 f" | {_VERDICT[vs['verdict']] if vs else '-'} |")
  lines.append('')
  sources = sorted({r['step_time_source'] for r in result['runs'].values()
                    if r.get('step_time_source')})
  if sources:
    lines.append('Step time ÷ dense: from ' + ' and '.join(sources) + '.')
  for name, r in result['runs'].items():
    if r['kind'] == 'control' and 'overall' in r['vs_dense_1x']:
      vs = r['vs_dense_1x']['overall']
      lines.append(f"Norm control: {name} (res-post norm, otherwise the dense model) vs "
                   f"dense pre-norm at 1×: overall {metric} {vs['diff']:+.4f}, "
                   f"{_VERDICT[vs['verdict']]}.")
  if result['capacity']:
    c = result['capacity']
    vs = c['compare']['overall']
    lines.append(f"Capacity check: {c['text']} (overall {metric} {vs['diff']:+.4f}).")
    if c.get('worth_in_dense_compute'):
      w = c['worth_in_dense_compute']
      lines.append(f"{c['wide']} at equal tokens matches dense trained on "
                   + ', '.join(f"{w[p]['text']}× ({p})" for p in PANELS)
                   + f" the compute of {c['reference']}: the η a sparse model reaches if its "
                   "extra parameters help as much as the wider dense model's.")
  for path, runs in result.get('merged', {}).items():
    lines.append(f'Seeds merged from {path}: ' + ', '.join(
        f"{name} ({', '.join(map(str, seeds))})" for name, seeds in runs.items()) + '.')
  if result['missing']:
    lines.append('Not complete yet: ' + ', '.join(result['missing']) + '.')
  for w in result.get('warnings', []):
    lines.append(f'Warning: {w}.')
  return '\n'.join(lines) + '\n'


def plot(result: dict, path: str) -> None:
  """Excess vs training FLOPs, log-log, one panel per modality (and overall): the dense
  curve (mean, seeds as dots, min-max band) and every other run as a point (± sd)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.2))
  markers = 'osD^v<>ph*'
  for ax, p in zip(axes, PANELS):
    if result['dense']:
      c = np.array([d['train_flops'] for d in result['dense']])
      vals = [d['excess'][p]['values'] for d in result['dense']]
      ax.plot(c, [np.mean(v) for v in vals], 'k-o', label='dense', zorder=3)
      ax.fill_between(c, [min(v) for v in vals], [max(v) for v in vals], color='k',
                      alpha=0.12, lw=0)
      for ci, v in zip(c, vals):
        ax.plot([ci] * len(v), v, '.', color='k', alpha=0.4, ms=4)
    for i, (name, r) in enumerate(result['runs'].items()):
      s = r['excess'][p]
      ax.errorbar([r['train_flops']], [s['mean']], yerr=[[s['sd'] or 0], [s['sd'] or 0]],
                  fmt=markers[i % len(markers)], ms=6, capsize=3, label=name, zorder=4)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel('training FLOPs')
    ax.set_ylabel(f"eval {result['metric']} (nats/token)")
    ax.set_title(p)
    ax.grid(True, which='both', alpha=0.3)
  if axes[-1].get_legend_handles_labels()[0]:
    axes[-1].legend(fontsize=7, loc='best')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(plan: list[dict], out: str, *, title: str = 'sweep', samples: int = 2000,
           merge=()) -> dict:
  """Analyse OUT's complete runs (and the seeds of the eta.json files in `merge` that OUT
  lacks); write OUT/eta.json, eta.md, eta.png. Returns eta.json."""
  loaded, warnings = load_runs(plan, out)
  warnings += merge_reports(loaded, plan, merge)
  step_times = None
  path = os.path.join(out, 'step_times.json')
  if os.path.exists(path):  # benchmarks/sweep_steps.py
    with open(path) as f:
      step_times = json.load(f)['step_time_ratio']
  result = analyse(plan, loaded, samples=samples, step_times=step_times)
  result['warnings'] = warnings
  result['merged'] = loaded['merged']
  result['title'] = title
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'eta.json'), 'w') as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out, 'eta.md'), 'w') as f:
    f.write(markdown(result, title))
  plot(result, os.path.join(out, 'eta.png'))
  return result
