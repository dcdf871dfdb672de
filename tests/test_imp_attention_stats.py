"""IMP's eval.json `attention` (projects/imp/evaluate.py `attention_stats`): the encoder's
sink share and peak activation, gated or not (docs/gates.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core import partitioning
from projects.imp import evaluate as imp_eval
from projects.imp import train as imp_loop
from tests.test_imp_train import small
from training import state as state_lib


@pytest.mark.parametrize('gate', ['none', 'headwise'])
def test_uniform_attention_gives_one_over_n_and_the_peak_is_the_streams(data_dir, gate):
  """W_Q = 0: every bidirectional query spreads 1/N over the N patches, so the sink share is
  1/N exactly (a causal mask would give the mean of 1/(t+1)); the peak equals the max |x|
  after any block, recomputed block by block."""
  config = small(data_dir, f'tiny,attn_gate={gate}')
  config.model.num_layers = 2
  config.eval.batch_size, config.eval.num_examples = 8, 16
  mesh = partitioning.make_mesh(config.mesh)
  layout = state_lib.state_layout(config, mesh)
  params = state_lib.init_state(config, layout)['params']
  model = nnx.merge(layout.graphdef, params)
  for block in model.encoder.blocks:
    block.attn.wq[...] = jnp.zeros_like(block.attn.wq[...])
  params = nnx.state(model, nnx.Param)
  stats = imp_eval.attention_stats(config, mesh, layout.graphdef, params)
  name, task = next(iter(imp_loop.task_specs(config).items()))
  assert stats['task'] == name
  image_size = task.get('image_size', config.data.image_size)
  n = (image_size // config.data.patch_size) ** 2
  np.testing.assert_allclose(stats['sink_share'], 1 / n, rtol=1e-5)

  runner = imp_eval._Runner(config, mesh, layout.graphdef, params)  # pylint: disable=protected-access
  peak = 0.0
  with jax.set_mesh(mesh):
    for batch in runner.batches(name, task, labels=False):
      x = model.image_embed(imp_loop.model_batch(task.kind, batch)['image'])
      mask = jnp.ones((x.shape[0], x.shape[1], x.shape[1]), jnp.bool_)
      for block in model.encoder.blocks:
        x, _ = block(x, mask)
        peak = max(peak, float(jnp.max(jnp.abs(x))))
  np.testing.assert_allclose(stats['max_activation'], peak, rtol=1e-5)
