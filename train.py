"""Train a model from a config; resumes from the latest checkpoint in --workdir.

  python train.py --config=configs/dense.py:tiny --workdir=runs/dense_tiny \
      [--config.total_steps=1000 --config.mesh.data=2 ...]

Multi-process: the same command on every process, plus --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (auto-detected on TPU pods, SLURM, Open MPI).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from training import cli, distributed

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
  cli.run('train.py', distributed.initialize_from_flags)  # before JAX touches a backend
  import jax  # after flag parsing, so --help is fast
  import trainers
  logging.info('JAX %s, %d %s devices', jax.__version__, jax.device_count(),
               jax.default_backend())
  config = _CONFIG.value
  cli.run('train.py', lambda: trainers.get(config).train(
      config, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value), workdir=_WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('train.py'))
