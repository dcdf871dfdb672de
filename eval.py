"""Evaluate the latest checkpoint in --workdir: writes WORKDIR/eval.json and loss-curve plots.

  python eval.py --config=configs/dense.py:tiny --workdir=runs/dense_tiny

Multi-process: like train.py (--coordinator_address, --num_processes, --process_id, or
auto-detected); process 0 writes eval.json and the plots.

MoMa (configs/moma.py, the same config arg as training's main stage): eval.json also has
each layer's expert load per modality (plotted in WORKDIR/routing_load.png) and, once the
aux stage has trained into WORKDIR/aux/, `causal_loss` / `causal_accuracy` per modality
from the auxiliary routers' causal routing. Layout: training/evaluate.py. The config's
trainer (trainers.py) picks the evaluation.

IMP (configs/imp.py): eval.json has `tasks` instead, one entry per task objective with its
metric, value and chance level (projects/imp/evaluate.py), and task_curves.png.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from training import distributed

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. '
                                          'configs/dense.py:tiny.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory holding checkpoints/.')
distributed.define_flags()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from training import metrics
  metrics.quiet_library_logs()
  try:
    distributed.initialize_from_flags()  # before anything touches a JAX backend
  except ValueError as e:
    print(f'eval.py: error: {e}', file=sys.stderr)
    sys.exit(1)
  import trainers
  try:
    report = trainers.get(_CONFIG.value).evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    logging.error('%s', e)
    print(f'eval.py: error: {e}', file=sys.stderr)
    sys.exit(1)
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  app.run(main)
