"""Measure η (training FLOPs a dense model needs to match a sparse one) with a preset of
configs/sweeps.py: dense at several compute points, the sparse families at one, all at equal
active FLOPs per token (checked); trains, evaluates and reports into --out. docs/eta.md.

  python sweep.py --sweep=tiny --dry_run                 # plan, FLOPs check, estimated time
  python sweep.py --sweep=tiny --seeds=2 --out=runs/eta_tiny
  python sweep.py --sweep=tiny --out=runs/eta_tiny --report_only
  python sweep.py --sweep=tiny --seeds=2 --only_seeds=1 --out=runs/b --merge=runs/a/eta.json

Re-running the same command resumes: complete runs (eval.json at their final step) are
skipped and train.py continues the others from their checkpoints. Writes OUT/eta.json,
OUT/eta.md, OUT/eta.png (and OUT/plan.json).
"""

import signal
import sys

from absl import app, flags

from configs import sweeps

_SWEEP = flags.DEFINE_enum('sweep', 'tiny', sorted(sweeps.PRESETS), 'Preset of '
                           'configs/sweeps.py.')
_SEEDS = flags.DEFINE_integer('seeds', None, 'Seeds 0..N-1 (default: the preset\'s).')
_OUT = flags.DEFINE_string('out', None, 'Sweep directory (default runs/eta_<sweep>).')
_DATA = flags.DEFINE_string('data', None, 'Dataset variant for every run\'s config arg '
                            '(default: the preset\'s; "" = the configs\' default dataset).')
_DRY = flags.DEFINE_bool('dry_run', False, 'Print the plan and estimated time; train '
                         'nothing.')
_ONLY = flags.DEFINE_list('only', [], 'Train only these runs (names from the plan); the '
                          'report still uses every complete run.')
_ONLY_SEEDS = flags.DEFINE_list('only_seeds', [], 'Train only these seeds (of 0..N-1, '
                                'N = --seeds); the report still uses every complete run.')
_REPORT = flags.DEFINE_bool('report_only', False, 'Write the report from the complete '
                            'runs; train nothing.')
_MERGE = flags.DEFINE_list('merge', [], 'Earlier reports (eta.json) of the same plan whose '
                           'seeds join the report where OUT lacks them (seeds trained on '
                           'another machine or in a workdir since deleted).')
_SAMPLES = flags.DEFINE_integer('bootstrap', 2000, 'Bootstrap replicates.')


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt  # the runner forwards SIGTERM to the training it waits for


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from training import eta, sweep  # pylint: disable=import-outside-toplevel
  name = _SWEEP.value
  seeds = _SEEDS.value or sweeps.PRESETS[name]['seeds']
  out = _OUT.value or f'runs/eta_{name}'
  try:
    plan = sweep.build_plan(name, data=_DATA.value, check=not _DRY.value)
  except (ValueError, KeyError) as e:
    print(f'sweep.py: error: {e}', file=sys.stderr)
    sys.exit(1)
  unknown = sorted(set(_ONLY.value) - {r.name for r in plan})
  if unknown:
    print(f'sweep.py: error: --only names no run of the plan: {unknown}; runs: '
          f'{[r.name for r in plan]}', file=sys.stderr)
    sys.exit(1)
  try:
    only_seeds = {int(s) for s in _ONLY_SEEDS.value}
  except ValueError:
    only_seeds = None
  if only_seeds is None or not only_seeds <= set(range(seeds)):
    print(f'sweep.py: error: --only_seeds={",".join(_ONLY_SEEDS.value)} is not a list of '
          f'seeds in 0..{seeds - 1} (--seeds={seeds})', file=sys.stderr)
    sys.exit(1)
  try:
    for path in _MERGE.value:
      eta.read_report(path)
  except ValueError as e:
    print(f'sweep.py: error: --merge: {e}', file=sys.stderr)
    sys.exit(1)
  sweep.estimate_times(plan, name, out)
  print(sweep.format_plan(plan, name, seeds, out))
  if _DRY.value:
    bad = [r.name for r in plan if not r.flops_ok]
    if bad:
      print(f'sweep.py: error: not at equal active FLOPs per token: {bad}', file=sys.stderr)
      sys.exit(1)
    return
  sweep.save_plan(plan, out, name, seeds)
  result = {'failed': []}
  if not _REPORT.value:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
      result = sweep.run_sweep(plan, out, seeds, only=set(_ONLY.value) or None,
                               only_seeds=only_seeds or None)
    except KeyboardInterrupt:
      print('\ninterrupted: re-run the same command to resume', file=sys.stderr)
      sys.exit(130)
  try:
    eta.report([r.as_dict() for r in plan], out, title=f'sweep `{name}` ({out})',
               samples=_SAMPLES.value, merge=_MERGE.value)
  except ValueError as e:
    print(f'sweep.py: error: --merge: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'wrote {out}/eta.json, eta.md, eta.png')
  if result['failed']:
    print('failed runs: ' + ', '.join(f'{n} seed {s}' for n, s, _ in result['failed']),
          file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
