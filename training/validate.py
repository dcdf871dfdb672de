"""Config checks that run before anything is built or compiled.

Each problem raises one `ValueError` whose message names the config key(s) at fault, so a
typo in an override fails in a second, not after a long compile. (Unknown keys are already
refused by `config_flags.DEFINE_config_file(lock_config=True)`.)
"""

from __future__ import annotations

import math

import jax

from core import layers, partitioning
from data import pipeline, tokenizer
from models import families, sampling
from moe import kernels
from training import stages

POSITIVE_INTS = ('total_steps', 'batch_size', 'seq_len', 'log_every', 'checkpoint_every',
                 'max_checkpoints', 'model.num_layers', 'model.embed_dim', 'model.num_heads',
                 'model.num_kv_heads', 'model.head_dim', 'model.mlp_dim', 'model.vocab_size',
                 'eval.batch_size')
DTYPES = ('float32', 'bfloat16', 'float16')


def _get(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def validate(config, num_devices: int) -> tuple[int, ...]:
  """The decoder trainer's checks: the shared ones, the family's (models/families.py) and the
  stage's (training/stages.py). Raise ValueError on the first problem; return the resolved
  mesh shape."""
  shape, sizes = validate_common(config, num_devices)
  family = families.get(config.model.family)
  family.validate(config, sizes)
  stages.check(config, family.stages)
  return shape


def validate_common(config, num_devices: int, *, skip: tuple[str, ...] = ()
                    ) -> tuple[tuple[int, ...], dict[str, int]]:
  """The checks every trainer shares (sizes, schedule, dtypes, attention shapes, mesh);
  `skip`: POSITIVE_INTS a trainer does not use. -> (mesh shape, {mesh axis: size})."""
  for key in POSITIVE_INTS:
    if key in skip:
      continue
    value = _get(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f'config.{key} must be a positive integer, got {value!r}')
  n = config.eval.num_examples
  if not isinstance(n, int) or isinstance(n, bool) or n < 0:
    raise ValueError(f'config.eval.num_examples must be a non-negative integer (0 = the '
                     f'whole eval split), got {n!r}')
  if config.warmup_steps < 0 or config.warmup_steps >= config.total_steps:
    raise ValueError(f'config.warmup_steps={config.warmup_steps} must be in '
                     f'[0, total_steps={config.total_steps})')
  if not config.learning_rate > 0 or not math.isfinite(config.learning_rate):
    raise ValueError(f'config.learning_rate must be positive, got {config.learning_rate}')
  if not 0 <= config.end_lr_factor <= 1:
    raise ValueError(f'config.end_lr_factor must be in [0, 1], got {config.end_lr_factor}')
  if config.grad_clip <= 0 or config.weight_decay < 0:
    raise ValueError(f'config.grad_clip must be > 0 and config.weight_decay >= 0, got '
                     f'{config.grad_clip} and {config.weight_decay}')
  for key in ('param_dtype', 'compute_dtype'):
    if config[key] not in DTYPES:
      raise ValueError(f'config.{key}={config[key]!r} is not one of {DTYPES}')
    if config[key] == 'float16' and jax.default_backend() == 'cpu':
      raise ValueError(f"config.{key}='float16' does not run on CPU (XLA's CPU matmuls "
                       "have no float16): use bfloat16 or float32")
  m = config.model
  pipeline.check_config(config.data)
  codebook = pipeline.codebook(config.data)
  needed = tokenizer.vocab_size(codebook, pipeline.image_vocab_size(config.data))
  if m.vocab_size < needed:
    raise ValueError(f'config.model.vocab_size={m.vocab_size} is smaller than the tokenizer '
                     f'vocabulary of data.codebook={codebook!r} and data.image_vocab_size='
                     f'{pipeline.image_vocab_size(config.data)} ({needed})')
  if m.num_heads * m.head_dim != m.embed_dim:
    raise ValueError(f'model.num_heads={m.num_heads} x model.head_dim={m.head_dim} must '
                     f'equal model.embed_dim={m.embed_dim}')
  if m.head_dim % 2:
    raise ValueError(f'model.head_dim={m.head_dim} must be even for RoPE')
  if m.num_heads % m.num_kv_heads:
    raise ValueError(f'model.num_kv_heads={m.num_kv_heads} must divide '
                     f'model.num_heads={m.num_heads}')
  if m.attention_impl not in ('', 'xla', 'cudnn'):
    raise ValueError(f"model.attention_impl={m.attention_impl!r} is not one of '', 'xla', "
                     f"'cudnn'")
  if m.attn_gate not in layers.ATTN_GATES:
    raise ValueError(f'config.model.attn_gate={m.attn_gate!r} is not one of '
                     f'{layers.ATTN_GATES}')
  if m.grouped_impl not in kernels.IMPLS:
    raise ValueError(f'model.grouped_impl={m.grouped_impl!r} is not one of {kernels.IMPLS}')

  shape = partitioning.resolve_mesh_shape(config.mesh, num_devices)
  sizes = dict(zip(partitioning.MESH_AXES, shape))
  batch_shards = sizes['data'] * sizes['fsdp'] * sizes['expert']
  if config.batch_size % batch_shards:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{batch_shards} batch shards (mesh.data x mesh.fsdp x mesh.expert = '
                     f"{sizes['data']} x {sizes['fsdp']} x {sizes['expert']})")
  if config.eval.batch_size % batch_shards:
    raise ValueError(f'config.eval.batch_size={config.eval.batch_size} is not divisible by '
                     f'the {batch_shards} batch shards')
  gen = config.eval.get('generation')
  if gen is not None:
    n = gen.num_examples
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
      raise ValueError(f'config.eval.generation.num_examples must be a non-negative integer '
                       f'(0 = off), got {n!r}')
    try:
      sampling.Sampling(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p).check()
    except ValueError as e:
      raise ValueError(str(e).replace('sampling.', 'config.eval.generation.')) from None
  t = sizes['tensor']
  for key, value in (('model.num_heads', m.num_heads), ('model.num_kv_heads', m.num_kv_heads),
                     ('model.mlp_dim', m.mlp_dim), ('model.vocab_size', m.vocab_size)):
    if value % t:
      raise ValueError(f'config.{key}={value} is not divisible by mesh.tensor={t}')
  if m.embed_dim % sizes['fsdp']:
    raise ValueError(f"model.embed_dim={m.embed_dim} is not divisible by "
                     f"mesh.fsdp={sizes['fsdp']}")
  return shape, sizes
