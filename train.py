"""Train a model from a config; resumes from the latest checkpoint in --workdir.

  python train.py --config=configs/dense.py:tiny --workdir=runs/dense_tiny \
      [--config.total_steps=1000 --config.mesh.data=2 ...]
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. '
                                          'configs/dense.py:tiny.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, eval.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from training import metrics
  metrics.quiet_library_logs()
  import jax  # after flag parsing, so --help is fast
  from training import loop
  logging.info('JAX %s, %d %s devices', jax.__version__, jax.device_count(),
               jax.default_backend())
  try:
    loop.train(_CONFIG.value, _WORKDIR.value)
  except (ValueError, loop.NonFiniteLossError) as e:
    logging.error('%s', e)
    print(f'train.py: error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
