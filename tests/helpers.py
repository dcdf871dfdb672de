"""Small shared builders for tests: a tiny config and a random batch."""

import numpy as np

from configs import dense
from data import tokenizer


def tiny_config(**overrides):
  """configs/dense.py:tiny shrunk further so a step compiles and runs in about a second."""
  c = dense.get_config('tiny')
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
