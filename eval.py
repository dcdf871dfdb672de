"""Evaluate the latest checkpoint in --workdir: writes WORKDIR/eval.json and loss-curve plots.

  python eval.py --workdir=runs/dense_tiny
  python eval.py --config=configs/dense.py:tiny --workdir=runs/dense_tiny \
      --config.eval.num_examples=0

The model is read with the config saved in its checkpoint. A --config is optional: it may
change the eval keys and the mesh (e.g. --config.eval.batch_size) and differ in training-only
keys (the schedule: training/checkpoint.py TRAINING_ONLY_KEYS); if it differs from the saved
one in anything that changes the model or the data, eval is refused naming the keys
(--allow_config_change evaluates anyway). Nothing is written unless eval succeeds.

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

from absl import app, flags
from ml_collections import config_flags

from training import cli, distributed

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Optional: the config file the run was trained with, e.g. '
    'configs/dense.py:tiny, to change eval keys. Default: the config saved in the checkpoint.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory holding checkpoints/.')
_ALLOW_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Evaluate with a --config that differs from the one the '
    'run was trained with (by default refused, naming the keys that differ).')
distributed.define_flags()
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from training import metrics
  metrics.quiet_library_logs()
  cli.run('eval.py', distributed.initialize_from_flags)  # before JAX touches a backend
  import trainers
  from training import run

  def evaluate():
    config = run.config_of_run(_WORKDIR.value, _CONFIG.value,
                               allow_config_change=_ALLOW_CHANGE.value)
    return trainers.get(config).evaluate(config, _WORKDIR.value)

  print(json.dumps(cli.run('eval.py', evaluate, workdir=_WORKDIR.value), indent=1))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('eval.py'))
