"""Parallel layout never changes the function: loss and gradients on every mesh equal the
single-device values, and parameters really are split."""

import jax
import numpy as np
import pytest

from core import partitioning
from tests.helpers import loss_and_grads, tiny_config

MESHES = [(1, 1, 1, 1), (8, 1, 1, 1), (2, 4, 1, 1), (2, 1, 1, 4), (1, 2, 2, 2)]


@pytest.fixture(scope='module')
def reference():
  config = tiny_config(**{'mesh.data': 1})
  loss, grads, _ = loss_and_grads(config, jax.devices()[:1])
  return loss, grads


@pytest.mark.parametrize('shape', MESHES, ids=lambda s: 'x'.join(map(str, s)))
def test_sharded_loss_and_grads_equal_single_device(shape, reference):
  config = tiny_config(**{f'mesh.{a}': s for a, s in zip(partitioning.MESH_AXES, shape)})
  devices = jax.devices()[:int(np.prod(shape))]
  loss, grads, params = loss_and_grads(config, devices)
  ref_loss, ref_grads = reference
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               grads, ref_grads)
  # The layout is real: weights split over fsdp x tensor hold 1/(fsdp*tensor) per device.
  w = params['blocks'][0]['ffn']['w_gate'][...]
  split = shape[1] * shape[3]
  assert w.addressable_shards[0].data.size == w.size // split


def test_rules_table_maps_each_mesh_axis_once():
  assert partitioning.logical_to_spec(('batch', 'length', 'act_embed')) == \
      jax.sharding.PartitionSpec(('data', 'fsdp', 'expert'), None, None)
  with pytest.raises(ValueError, match='twice'):
    partitioning.logical_to_spec(('batch', 'embed'))  # fsdp used by both
  with pytest.raises(KeyError, match='no rule'):
    partitioning.logical_to_spec(('nonexistent',))
