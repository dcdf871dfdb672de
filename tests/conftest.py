"""Test setup: 8 fake CPU devices for the whole run (set before jax is imported)."""

import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
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
