"""Test setup: 8 fake CPU devices for the whole run (set before jax is imported), and one
persistent XLA compilation cache for the run."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests compile the same computation again (a fresh jax.jit of the same model, the
# unsharded reference of several sharded cases, train.py restarted after a kill): XLA's
# persistent cache gives each repeat the executable compiled the first time (the cache key
# is the computation, its compile options and devices, and the jax/XLA version, so a hit is
# the same executable a compile would give). One fresh directory per pytest run: the
# controller makes it, pytest-xdist workers and the train.py / eval.py subprocesses the
# tests start inherit it through the environment; whoever made it removes it at exit.
# JAX_COMPILATION_CACHE_DIR set beforehand (or to '' to turn the cache off) is kept.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix='jax_test_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import pytest  # noqa: E402

assert jax.device_count() == 8, 'tests need 8 fake CPU devices; import jax after conftest'


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One prepared copy of the embedded dataset for the whole test session."""
  from data import shapes
  path = str(tmp_path_factory.mktemp('tfds'))
  shapes.prepare(path)
  return path
