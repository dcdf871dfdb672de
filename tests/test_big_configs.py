"""Large configs are correct by construction: built abstractly on fake meshes, never run.

For every size, the abstract train state has the parameter count the size table promises,
every sharding divides its array evenly, FSDP/tensor layouts cut per-device parameter bytes
by the shard count, and the train step traces (shapes + shardings) without compiling.
"""

import functools

import jax
import numpy as np
import pytest

from configs import common, dense
from core import partitioning
from models import transformer
from training import state as state_lib, step as step_lib

SIZES_AND_MESHES = [
    ('small', {'data': 2, 'fsdp': 2, 'tensor': 2}),
    ('base', {'data': 1, 'fsdp': 8, 'tensor': 1}),
    ('1b', {'data': 1, 'fsdp': 4, 'tensor': 2}),
]


@pytest.mark.parametrize('size,mesh_sizes', SIZES_AND_MESHES, ids=lambda x: str(x))
def test_abstract_state_and_step(size, mesh_sizes):
  config = dense.get_config(size)
  for axis, n in mesh_sizes.items():
    config.mesh[axis] = n
  config.batch_size = 8  # tracing only; keep the abstract batch small
  mesh = partitioning.make_mesh(config.mesh)
  layout = state_lib.state_layout(config, mesh)

  params = layout.abstract['params']
  spec = state_lib.model_spec(config)
  assert state_lib.count_params(params) == transformer.param_count(spec)
  split = mesh_sizes['fsdp'] * mesh_sizes['tensor']
  total, per_device = 0, 0
  for leaf in jax.tree.leaves(params):
    shard_shape = leaf.sharding.shard_shape(leaf.shape)  # raises if it does not divide
    total += leaf.size
    per_device += int(np.prod(shard_shape))
  # Everything but the norm scales (tiny, replicated) is split `split` ways.
  norms = (2 * spec.num_layers + 1) * spec.embed_dim
  assert per_device == (total - norms) // split + norms

  batch = {k: jax.ShapeDtypeStruct((config.batch_size, config.seq_len), dtype,
                                   sharding=partitioning.batch_sharding(mesh))
           for k, dtype in (('tokens', np.int32), ('targets', np.int32),
                            ('modality', np.int32), ('target_modality', np.int32),
                            ('loss_mask', np.float32))}
  fn = functools.partial(step_lib.train_step, graphdef=layout.graphdef, tx=layout.tx,
                         num_modalities=2)
  with jax.set_mesh(mesh):
    new_state, metrics = jax.eval_shape(fn, layout.abstract, batch)
  assert jax.tree.structure(new_state) == jax.tree.structure(layout.abstract)
  assert metrics['loss'].shape == ()


def test_size_table_matches_the_papers_shapes():
  # MoMa's dense baselines (layers / width / FFN / heads): 90M, 435M and 1.4B classes.
  for size, shape in (('small', (8, 512, 2048, 8)), ('base', (24, 1024, 4096, 16)),
                      ('1b', (24, 2048, 8192, 16))):
    s = common.SIZES[size]
    assert (s['num_layers'], s['embed_dim'], s['mlp_dim'], s['num_heads']) == shape
  n = transformer.param_count(state_lib.model_spec(dense.get_config('1b')))
  assert 1.3e9 < n < 1.7e9, n  # 1.61B: 24 x (4 D^2 + 3 D F), tiny vocab
