"""Train a model from a config; resumes from the latest checkpoint in --workdir.

  python train.py --config=configs/dense.py:tiny --workdir=runs/dense_tiny \
      [--config.total_steps=1000 --config.mesh.data=2 ...]

Multi-process: the same command on every process, plus --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (auto-detected on TPU pods, SLURM, Open MPI).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from training import distributed

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. '
                                          'configs/dense.py:tiny.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, eval.')
_ALLOW_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Resume a --workdir whose checkpoint was written with '
    'another config (by default refused, naming the keys that differ; the mesh, logging '
    'and eval keys may always change).')
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
    print(f'train.py: error: {e}', file=sys.stderr)
    sys.exit(1)
  import jax  # after flag parsing, so --help is fast
  import trainers
  from training import run
  logging.info('JAX %s, %d %s devices', jax.__version__, jax.device_count(),
               jax.default_backend())
  try:
    trainers.get(_CONFIG.value).train(_CONFIG.value, _WORKDIR.value,
                                      allow_config_change=_ALLOW_CHANGE.value)
  except (ValueError, run.NonFiniteLossError) as e:
    logging.error('%s', e)
    print(f'train.py: error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
