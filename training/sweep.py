"""The η sweep's plan and runner (configs/sweeps.py presets; sweep.py is the entry point).

A plan is a list of `PlannedRun`s: each run's config arg, `--config.` overrides, step budget,
active training FLOPs per token (training/flops.py) and its ratio to the dense model's,
parameter counts and estimated time. `build_plan` refuses a sparse or control run more than
`FLOPS_TOLERANCE` away from dense FLOPs per token; a run with `match` first gets layers
added while under the dense FLOPs, then the `match` width solved (FLOPs are affine in it).

`run_sweep` trains and evaluates every (seed, run) in a fixed, seed-major order into
OUT/<run>/seed<k>/, skipping those whose eval.json has the run's final step: re-running the
same command resumes (train.py restarts from the run's newest checkpoint itself). The runner
that executes train.py / eval.py is injected, so tests need no training.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from typing import Callable

from configs import sweeps
from models import transformer
from training import flops, metrics, state as state_lib
from training.validate import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_FILE = 'run.json'  # in each run's workdir: the run's identity (config, overrides, steps)
Runner = Callable[[list, str, Callable[[str], None]], int]


def load_config(config_arg: str, overrides: dict | None = None):
  """'configs/moma.py:tiny,groups=4t4i' (+ {'model.num_layers': 7}) -> ConfigDict, as
  train.py's --config flag would build it."""
  path, _, arg = config_arg.partition(':')
  spec = importlib.util.spec_from_file_location(
      'sweep_config_' + os.path.basename(path)[:-3], os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  for key, value in (overrides or {}).items():
    set_key(config, key, value)
  return config


def set_key(config, key: str, value) -> None:
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise KeyError(f'unknown config key {key!r}')
  old = node[leaf]
  node[leaf] = type(old)(value) if isinstance(old, (int, float)) and not isinstance(
      old, bool) else value


def flops_per_token(config) -> float:
  return flops.train_flops_per_token(state_lib.model_spec(config), config.seq_len)


def match_flops(config_arg: str, overrides: dict, target: float, key: str,
                multiple: int = 8) -> dict:
  """Overrides that bring a run to `target` FLOPs per token: layers added while the run
  stays under it (mixture-of-depths skips most of a layer), then `key` (a width) solved
  from two evaluations, rounded to `multiple`."""
  overrides = dict(overrides)
  config = load_config(config_arg, overrides)
  layers = config.model.num_layers
  while flops_per_token(load_config(config_arg, {**overrides,
                                                 'model.num_layers': layers + 1})) <= target:
    layers += 1
  overrides['model.num_layers'] = layers
  config = load_config(config_arg, overrides)
  width = _get(config, key)
  f0 = flops_per_token(config)
  f1 = flops_per_token(load_config(config_arg, {**overrides, key: width + multiple}))
  solved = width + (target - f0) / ((f1 - f0) / multiple)
  overrides[key] = max(multiple, int(round(solved / multiple)) * multiple)
  return overrides


def _get(config, key: str):
  node = config
  for p in key.split('.'):
    node = node[p]
  return node


@dataclasses.dataclass
class PlannedRun:
  name: str
  kind: str  # dense | sparse | control | capacity
  speed: str  # throughput class for time estimates
  config_arg: str
  overrides: dict  # --config.KEY=VALUE beyond steps, warmup and seed
  steps: int
  warmup_steps: int
  multiplier: float  # of the preset's base_steps
  batch_size: int
  seq_len: int
  flops_per_token: float
  flops_ratio: float  # to the dense model's
  params: int
  active_params: int
  est_step_s: float = 0.0
  est_source: str = ''  # 'measured' | 'assumed'

  @property
  def train_flops(self) -> float:
    return self.flops_per_token * self.batch_size * self.seq_len * self.steps

  @property
  def flops_ok(self) -> bool:
    return self.kind == 'capacity' or abs(self.flops_ratio - 1) <= sweeps.FLOPS_TOLERANCE

  def workdir(self, out: str, seed: int) -> str:
    return os.path.join(out, self.name, f'seed{seed}')

  def config_flags(self, seed: int) -> list[str]:
    flags = [f'--config={self.config_arg}', f'--config.total_steps={self.steps}',
             f'--config.warmup_steps={self.warmup_steps}', f'--config.seed={seed}']
    return flags + [f'--config.{k}={v}' for k, v in self.overrides.items()]

  def argv(self, script: str, out: str, seed: int) -> list[str]:
    return [sys.executable, os.path.join(ROOT, script), *self.config_flags(seed),
            f'--workdir={os.path.abspath(self.workdir(out, seed))}']  # child cwd: ROOT

  def identity(self) -> dict:
    """What makes two runs the same run (written to WORKDIR/run.json; the seed is the
    directory's)."""
    return {'config_arg': self.config_arg, 'overrides': self.overrides, 'steps': self.steps,
            'warmup_steps': self.warmup_steps}

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), 'train_flops': self.train_flops}


def _config_arg(run: dict, size: str, data: str) -> str:
  parts = [size] + ([run['variants']] if run['variants'] else []) + (
      [f'data={data}'] if data else [])
  return f"configs/{run['config']}:{','.join(parts)}"


def _fmt_mult(m: float) -> str:
  return f'{m:g}x'


def build_plan(preset: str | dict, *, data: str | None = None, check: bool = True,
               runs: tuple | None = None) -> list[PlannedRun]:
  """The preset's runs in training order (dense points at each multiplier, late ones after
  the sparse runs). `runs`: default the preset's `runs`, else sweeps.RUNS. `data`: dataset
  variant ('' = the configs' default, None = preset's). `check`: raise ValueError naming
  every run off the dense FLOPs per token by more than 1%."""
  p = sweeps.PRESETS[preset] if isinstance(preset, str) else preset
  runs = runs or p.get('runs', sweeps.RUNS)
  data = p['data'] if data is None else data
  dense_arg = _config_arg(next(r for r in runs if r['kind'] == 'dense'), p['size'], data)
  try:
    target = flops_per_token(load_config(dense_arg, p['overrides']))
  except (KeyError, ValueError) as e:
    raise ValueError(f'sweep run dense: {dense_arg}: {e}') from e
  early, late = [], []
  for run in runs:
    arg = _config_arg(run, p['size'], data)
    overrides = {**p['overrides'], **p.get('run_overrides', {}).get(run['name'], {})}
    if run.get('match'):
      overrides = match_flops(arg, overrides, target, run['match'])
    mults = p['dense_multipliers'] if run['kind'] == 'dense' else (1,)
    budgets = [(m, max(2, int(round(p['base_steps'] * m)))) for m in mults]
    budgets = [(m, s, max(1, int(round(s * p['warmup_fraction'])))) for m, s in budgets]
    try:
      config = load_config(arg, overrides)
      for _, steps, warmup in budgets:  # what train.py checks first (one device)
        config.total_steps, config.warmup_steps = steps, warmup
        validate(config, 1)
    except (KeyError, ValueError) as e:
      raise ValueError(f"sweep run {run['name']}: {arg} {overrides}: {e}") from e
    spec = state_lib.model_spec(config)
    fpt = flops_per_token(config)
    for m, steps, warmup in budgets:
      planned = PlannedRun(
          name=f"{run['name']}_{_fmt_mult(m)}" if run['kind'] == 'dense' else run['name'],
          kind=run['kind'], speed=run['speed'], config_arg=arg, overrides=overrides,
          steps=steps, warmup_steps=warmup,
          multiplier=float(m), batch_size=config.batch_size, seq_len=config.seq_len,
          flops_per_token=fpt, flops_ratio=fpt / target,
          params=transformer.param_count(spec),
          active_params=transformer.param_count(spec, active=True))
      (late if run['kind'] == 'dense' and m in sweeps.LATE_MULTIPLIERS else early).append(
          planned)
  plan = early + late
  bad = [r for r in plan if not r.flops_ok]
  if check and bad:
    raise ValueError('active training FLOPs per token differ from dense by more than '
                     f'{sweeps.FLOPS_TOLERANCE:.0%}: ' + ', '.join(
                         f'{r.name} ({r.flops_ratio:.4f}x)' for r in bad))
  return plan


# ---------------------------------------------------------------------------------------
# Time estimates


def median_tokens_per_s(workdirs: list[str]) -> float | None:
  values = [r['perf/tokens_per_s'] for w in workdirs for r in metrics.read_metrics(w)
            if 'perf/tokens_per_s' in r]
  return statistics.median(values) if values else None


def estimate_times(plan: list[PlannedRun], preset: str | dict, out: str | None) -> None:
  """Fill each run's est_step_s: from the median measured tokens/s of OUT's runs of the
  same speed class and FLOPs per token, else the preset device's assumption."""
  p = sweeps.PRESETS[preset] if isinstance(preset, str) else preset
  device = p['device']
  for run in plan:
    tokens = run.batch_size * run.seq_len
    measured = None
    if out:
      dirs = [d for r in plan if r.speed == run.speed
              and abs(r.flops_per_token / run.flops_per_token - 1) < 1e-6
              for d in glob.glob(os.path.join(out, r.name, 'seed*'))]
      measured = median_tokens_per_s(dirs)
    if measured:
      run.est_step_s, run.est_source = tokens / measured, 'measured'
    else:
      ratio = sweeps.STEP_TIME_RATIO[device].get(run.speed, 1.0)
      run.est_step_s = tokens * run.flops_per_token / sweeps.DENSE_FLOPS_PER_S[device] * ratio
      run.est_source = 'assumed'


def run_seconds(run: PlannedRun, device: str) -> float:
  return run.steps * run.est_step_s + sweeps.RUN_OVERHEAD_S[device]


def _hms(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else (
      f'{seconds // 60}m{seconds % 60:02d}s')


def format_plan(plan: list[PlannedRun], preset: str | dict, seeds: int,
                out: str | None = None) -> str:
  """The dry run's table: run, steps, FLOPs per token and ratio (1% check), parameters,
  training FLOPs, estimated time per seed, seeds done; then the totals."""
  p = sweeps.PRESETS[preset] if isinstance(preset, str) else preset
  device = p['device']
  head = (f"{'run':<17} {'kind':<8} {'steps':>6} {'FLOPs/tok':>9} {'/dense':>7} "
          f"{'check':<5} {'params':>7} {'active':>7} {'train FLOPs':>11} {'est/seed':>8} "
          f"{'done':>4}  config")
  lines = [head, '-' * len(head)]
  total = remaining = 0.0
  for r in plan:
    done = sum(is_complete(r.workdir(out, s), r.steps) for s in range(seeds)) if out else 0
    secs = run_seconds(r, device)
    total += secs * seeds
    remaining += secs * (seeds - done)
    check = 'n/a' if r.kind == 'capacity' else 'ok' if r.flops_ok else 'FAIL'
    extra = ' '.join(f'{k}={v}' for k, v in r.overrides.items() if k not in p['overrides'])
    lines.append(
        f'{r.name:<17} {r.kind:<8} {r.steps:>6} {r.flops_per_token / 1e6:>8.3f}M '
        f'{r.flops_ratio:>7.4f} {check:<5} {r.params / 1e6:>6.2f}M '
        f'{r.active_params / 1e6:>6.2f}M {r.train_flops:>11.3e} '
        f"{_hms(secs) + ('*' if r.est_source == 'assumed' else ''):>8} {done:>4}  "
        f'{r.config_arg}' + (f' {extra}' if extra else ''))
  b, t = plan[0].batch_size, plan[0].seq_len
  lines += ['', f"batch {b} x {t} tokens; common overrides: "
            + ' '.join(f'{k}={v}' for k, v in p['overrides'].items()),
            f'estimated time ({device}; * = assumed throughput, configs/sweeps.py'
            + (f'; else measured in {out}' if out else '') + f'): {_hms(total)} for '
            f'{seeds} seed(s), {_hms(remaining)} remaining']
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------
# Running and resuming


def read_eval(workdir: str) -> dict | None:
  path = os.path.join(workdir, 'eval.json')
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def is_complete(workdir: str, steps: int) -> bool:
  report = read_eval(workdir)
  return report is not None and report.get('step') == steps


def identity_mismatch(workdir: str, identity: dict) -> str | None:
  """Why WORKDIR was made by another run than `identity` (None: same run, or new)."""
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  differ = sorted(k for k in identity if json.dumps(saved.get(k), sort_keys=True)
                  != json.dumps(identity[k], sort_keys=True))
  if not differ:
    return None
  return (f'{workdir} holds a run made with other settings ({", ".join(differ)}: '
          f'{ {k: saved.get(k) for k in differ} } -> { {k: identity[k] for k in differ} }); '
          f'use a new --out or delete that directory')


_STEP_LINE = re.compile(r'(step \d+/\d+.*)')


def subprocess_runner(argv: list, log_path: str, progress: Callable[[str], None]) -> int:
  """Run argv (cwd: the repository), appending its output to log_path and passing each
  `step N/M ...` line to `progress`. The child runs in its own session, so a terminal's
  Ctrl-C reaches only the sweep, which then sends the child SIGTERM (train.py saves a
  checkpoint and exits) and waits for it before re-raising."""
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  with open(log_path, 'a') as log:
    log.write(f"\n$ {' '.join(argv)}\n")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
      for line in proc.stdout:
        log.write(line)
        m = _STEP_LINE.search(line)
        if m:
          progress(m.group(1).strip())
      return proc.wait()
    except KeyboardInterrupt:
      proc.send_signal(signal.SIGTERM)
      try:
        log.write(proc.communicate(timeout=600)[0] or '')
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      raise


class Progress:
  """One status line per run: rewritten in place on a terminal, else at most once a
  minute."""

  def __init__(self, stream=None):
    self.stream = stream or sys.stdout
    self.tty = self.stream.isatty()
    self.prefix, self.last = '', 0.0

  def start(self, prefix: str) -> None:
    self.prefix, self.last = prefix, 0.0
    self.line(prefix)

  def update(self, text: str) -> None:
    if self.tty:
      self.stream.write(f'\r\033[K{self.prefix} {text}')
      self.stream.flush()
    elif time.time() - self.last > 60:
      self.last = time.time()
      self.line(f'{self.prefix} {text}')

  def line(self, text: str) -> None:
    self.stream.write(('\r\033[K' if self.tty else '') + text + '\n')
    self.stream.flush()


def _tail(path: str, n: int = 5) -> str:
  try:
    with open(path) as f:
      return ''.join(f.readlines()[-n:]).rstrip()
  except OSError:
    return ''


def run_sweep(plan: list[PlannedRun], out: str, seeds: int, *,
              runner: Runner = subprocess_runner, only: set[str] | None = None,
              only_seeds: set[int] | None = None,
              progress: Progress | None = None) -> dict:
  """Train + evaluate every (seed, run) not complete yet, seed-major (`only` / `only_seeds`:
  just these run names / seeds). A failed run is named (with its log's tail) and the sweep
  goes on. Returns {'done', 'skipped', 'failed'}."""
  progress = progress or Progress()
  jobs = [(s, r) for s in range(seeds) for r in plan
          if (not only or r.name in only) and (not only_seeds or s in only_seeds)]
  result = {'done': [], 'skipped': [], 'failed': []}
  for i, (seed, run) in enumerate(jobs):
    wd = run.workdir(out, seed)
    tag = f'[{i + 1}/{len(jobs)}] seed {seed} {run.name}'
    mismatch = identity_mismatch(wd, run.identity())
    if mismatch:
      result['failed'].append((run.name, seed, mismatch))
      progress.line(f'{tag}: FAILED: {mismatch}')
      continue
    if is_complete(wd, run.steps):
      result['skipped'].append((run.name, seed))
      progress.line(f'{tag}: done (eval.json at step {run.steps})')
      continue
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, RUN_FILE), 'w') as f:
      json.dump(run.identity(), f, indent=1)
    t0 = time.time()
    progress.start(f'{tag}: {run.steps} steps (~{_hms(run.steps * run.est_step_s)})')
    failed = None
    for script in ('train.py', 'eval.py'):
      log_path = os.path.join(wd, script.replace('.py', '.log'))
      rc = runner(run.argv(script, out, seed), log_path, progress.update)
      if rc != 0:
        failed = f'{script} exited with {rc}; {log_path}:\n{_tail(log_path)}'
        break
    if failed is None and not is_complete(wd, run.steps):
      failed = f'eval.json in {wd} is missing or not at step {run.steps}'
    if failed:
      result['failed'].append((run.name, seed, failed))
      progress.line(f'{tag}: FAILED: {failed}')
    else:
      result['done'].append((run.name, seed))
      progress.line(f'{tag}: done in {_hms(time.time() - t0)}')
  return result


def save_plan(plan: list[PlannedRun], out: str, preset: str, seeds: int) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'plan.json'), 'w') as f:
    json.dump({'preset': preset, 'seeds': seeds,
               'runs': [r.as_dict() for r in plan]}, f, indent=1)


def copy_preset(preset: str) -> dict:
  """A deep copy of a preset to modify (tests, ad hoc sweeps)."""
  return copy.deepcopy(sweeps.PRESETS[preset])
