"""Small shared builders for tests: a tiny config and a random batch."""

import functools

import jax
import numpy as np
from flax import nnx

from configs import dense
from core import partitioning
from data import tokenizer
from training import state as state_lib, step as step_lib


def tiny_config(base=None, **overrides):
  """configs/dense.py:tiny shrunk further so a step compiles and runs in about a second."""
  c = base or dense.get_config('tiny')
  c.model.num_layers = 2
  c.model.embed_dim = 64
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.head_dim = 16
  c.model.mlp_dim = 128
  c.batch_size = 8
  c.seq_len = 32
  c.total_steps = 40
  c.warmup_steps = 4
  c.log_every = 10
  c.checkpoint_every = 20
  c.eval.batch_size = 8
  c.eval.num_examples = 64
  c.eval.generation.num_examples = 0  # on in the tests of generation (test_generation.py)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def random_batch(batch_size, seq_len, seed=0):
  """A batch with the pipeline's keys, random mixed-modality tokens and some padding."""
  rng = np.random.default_rng(seed)
  is_image = rng.random((batch_size, seq_len + 1)) < 0.5
  seq = np.where(is_image,
                 rng.integers(tokenizer.IMAGE_OFFSET,
                              tokenizer.IMAGE_OFFSET + tokenizer.NUM_IMAGE_CODES,
                              is_image.shape),
                 rng.integers(tokenizer.TEXT_OFFSET, tokenizer.TEXT_OFFSET + 256,
                              is_image.shape)).astype(np.int32)
  for b in range(batch_size):  # ragged padding at the end of some rows
    seq[b, seq_len + 1 - rng.integers(0, seq_len // 4):] = tokenizer.PAD
  tokens, targets = seq[:, :-1], seq[:, 1:]
  return {'tokens': tokens, 'targets': targets,
          'modality': tokenizer.modality_of(tokens).astype(np.int32),
          'target_modality': tokenizer.modality_of(targets).astype(np.int32),
          'loss_mask': (targets != tokenizer.PAD).astype(np.float32)}


def loss_and_grads(config, devices):
  """Loss, gradients (pure dict) and params of a fresh init on a mesh over `devices`."""
  mesh = partitioning.make_mesh(config.mesh, devices=devices)
  layout = state_lib.state_layout(config, mesh)
  state = state_lib.init_state(config, layout)
  batch = partitioning.shard_batch(random_batch(config.batch_size, config.seq_len),
                               partitioning.batch_sharding(mesh))
  fn = functools.partial(step_lib.loss_fn, graphdef=layout.graphdef, num_modalities=2)
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: fn(p, batch=b)[0]))
  with jax.set_mesh(mesh):
    loss, grads = grad_fn(state['params'], batch)
  return jax.device_get(loss), jax.device_get(nnx.to_pure_dict(grads)), state['params']
