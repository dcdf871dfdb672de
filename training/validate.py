"""Config checks that run before anything is built or compiled.

Each problem raises one `ValueError` whose message names the config key(s) at fault, so a
typo in an override fails in a second, not after a long compile. (Unknown keys are already
refused by `config_flags.DEFINE_config_file(lock_config=True)`.)
"""

from __future__ import annotations

import math
import os

from data import tokenizer
from training import sharding

POSITIVE_INTS = ('total_steps', 'batch_size', 'seq_len', 'log_every', 'checkpoint_every',
                 'max_checkpoints', 'model.num_layers', 'model.embed_dim', 'model.num_heads',
                 'model.num_kv_heads', 'model.head_dim', 'model.mlp_dim', 'model.vocab_size',
                 'eval.batch_size')
DTYPES = ('float32', 'bfloat16', 'float16')
FAMILIES = ('dense', 'moe', 'moma', 'mot', 'imp')
STAGES = ('main', 'aux')


def _get(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def validate(config, num_devices: int) -> tuple[int, ...]:
  """Raise ValueError on the first problem; return the resolved mesh shape."""
  for key in POSITIVE_INTS:
    if key == 'seq_len' and config.model.family == 'imp':
      continue  # each IMP task has its own shapes
    value = _get(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f'config.{key} must be a positive integer, got {value!r}')
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
  m = config.model
  codebook = config.data.get('codebook', 'rgb64')
  tokenizer.check_codebook(codebook)
  if m.vocab_size < tokenizer.vocab_size(codebook):
    raise ValueError(f'config.model.vocab_size={m.vocab_size} is smaller than the tokenizer '
                     f'vocabulary of data.codebook={codebook!r} '
                     f'({tokenizer.vocab_size(codebook)})')
  if m.family not in FAMILIES:
    raise ValueError(f'config.model.family={m.family!r} is not one of {FAMILIES}')
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

  shape = sharding.resolve_mesh_shape(config.mesh, num_devices)
  sizes = dict(zip(sharding.MESH_AXES, shape))
  batch_shards = sizes['data'] * sizes['fsdp'] * sizes['expert']
  if config.batch_size % batch_shards:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{batch_shards} batch shards (mesh.data x mesh.fsdp x mesh.expert = '
                     f"{sizes['data']} x {sizes['fsdp']} x {sizes['expert']})")
  if config.eval.batch_size % batch_shards:
    raise ValueError(f'config.eval.batch_size={config.eval.batch_size} is not divisible by '
                     f'the {batch_shards} batch shards')
  t = sizes['tensor']
  for key, value in (('model.num_heads', m.num_heads), ('model.num_kv_heads', m.num_kv_heads),
                     ('model.mlp_dim', m.mlp_dim), ('model.vocab_size', m.vocab_size)):
    if value % t:
      raise ValueError(f'config.{key}={value} is not divisible by mesh.tensor={t}')
  if m.embed_dim % sizes['fsdp']:
    raise ValueError(f"model.embed_dim={m.embed_dim} is not divisible by "
                     f"mesh.fsdp={sizes['fsdp']}")
  if m.family == 'moe':
    _validate_moe(config, sizes)
  if m.family == 'moma':
    _validate_moma(config, sizes)
  if m.family == 'mot':
    _validate_mot(config, sizes)
  if m.family == 'imp':
    _validate_imp(config, sizes)
  return shape


def _validate_imp(config, sizes) -> None:
  from data import imp_tasks  # local: keep `validate` importable without flax
  from models import imp
  from training import agd, imp_loop
  if config.agd.mode not in imp_loop.MODES:
    raise ValueError(f'config.agd.mode={config.agd.mode!r} is not one of {imp_loop.MODES}')
  if not config.tasks:
    raise ValueError('config.tasks is empty: IMP needs at least one task')
  shards = sizes['data'] * sizes['fsdp'] * sizes['expert']
  spec = imp.spec_from_config(config.model, param_dtype=config.param_dtype,
                              compute_dtype=config.compute_dtype)
  imp.check_spec(spec)
  for name, task in config.tasks.items():
    imp_tasks.check_task(name, task)
    if task.batch_size % shards:
      raise ValueError(f'config.tasks.{name}.batch_size={task.batch_size} is not divisible '
                       f'by the {shards} batch shards')
    if task.image_size % spec.patch_size:
      raise ValueError(f'config.tasks.{name}.image_size={task.image_size} is not a multiple '
                       f'of model.imp.patch_size={spec.patch_size}')
    if task.kind != 'classify' and task.text_len > spec.max_text_len:
      raise ValueError(f'config.tasks.{name}.text_len={task.text_len} exceeds '
                       f'model.imp.max_text_len={spec.max_text_len}')
  heads = [h for h, _ in spec.classifiers]
  for name, head in imp_loop.task_heads(config).items():  # every task checked above
    if head not in heads:
      raise ValueError(f'config.tasks.{name}.head={config.tasks[name].get("head", "")!r}: '
                       f'name one of the classifier heads in model.imp.classifiers: {heads}')
  prompts = config.eval.get('zeroshot_prompts')
  if (not isinstance(prompts, (tuple, list)) or not prompts
      or any(not isinstance(p, str) or p.count('{}') != 1 for p in prompts)):
    raise ValueError(f'config.eval.zeroshot_prompts={prompts!r} must be a non-empty list of '
                     "strings each holding one '{}' for the class name, e.g. ['a {}']")
  agd.make_schedule(config.agd.schedule, [
      agd.Task(n, weight=float(t.weight), interval=t.interval)
      for n, t in config.tasks.items()], seed=config.seed)


def _validate_moe(config, sizes) -> None:
  from models import transformer  # local: keep `validate` importable without flax
  from moe import layer as moe_layer
  moe = config.model.moe
  for key in ('num_experts', 'k', 'mlp_dim', 'every'):
    if not isinstance(moe[key], int) or moe[key] <= 0:
      raise ValueError(f'config.model.moe.{key} must be a positive integer, got {moe[key]!r}')
  if moe.dispatch == 'capacity' and not moe.capacity_factor > 0:
    raise ValueError(f'config.model.moe.capacity_factor must be > 0, got '
                     f'{moe.capacity_factor!r}')
  if moe.mlp_dim % sizes['tensor']:
    raise ValueError(f"config.model.moe.mlp_dim={moe.mlp_dim} is not divisible by "
                     f"mesh.tensor={sizes['tensor']}")
  spec = transformer.moe_spec_from_config(moe)
  moe_layer.check_moe_spec(spec, seq_len=config.seq_len, expert_shards=sizes['expert'])
  group = moe.group_size or config.seq_len
  groups = config.batch_size * config.seq_len // group
  shards = sizes['data'] * sizes['fsdp'] * sizes['expert']
  if groups % shards:
    raise ValueError(f'{groups} routing groups of model.moe.group_size={group} tokens do not '
                     f'split over the {shards} batch shards')


def _validate_moma(config, sizes) -> None:
  from models import mod as mod_lib, moma as moma_lib, transformer
  mm = config.model.moma
  if config.stage not in STAGES:
    raise ValueError(f'config.stage={config.stage!r} is not one of {STAGES}')
  for key in ('mlp_dim', 'k', 'group_sequences'):
    if not isinstance(mm[key], int) or mm[key] <= 0:
      raise ValueError(f'config.model.moma.{key} must be a positive integer, got {mm[key]!r}')
  if not isinstance(mm.shared_experts, int) or mm.shared_experts < 0:
    raise ValueError(f'config.model.moma.shared_experts must be >= 0, got '
                     f'{mm.shared_experts!r}')
  for key in ('capacity', 'shared_capacity'):
    if str(mm[key]) != '':
      try:
        float(mm[key])
      except ValueError:
        raise ValueError(f"config.model.moma.{key}={mm[key]!r} is not a number or ''") from None
  spec = transformer.moma_spec_from_config(mm)  # parses groups: clear errors
  moma_lib.check_spec(spec, expert_shards=sizes['expert'])
  if mm.mod.enabled:
    mod_lib.check_spec(transformer.mod_spec_from_config(mm.mod))
  if mm.mlp_dim % sizes['tensor']:
    raise ValueError(f"config.model.moma.mlp_dim={mm.mlp_dim} is not divisible by "
                     f"mesh.tensor={sizes['tensor']}")
  shards = sizes['data'] * sizes['fsdp'] * sizes['expert']
  if config.batch_size % mm.group_sequences or (
      config.batch_size // mm.group_sequences) % shards:
    raise ValueError(f'config.model.moma.group_sequences={mm.group_sequences}: the '
                     f'batch of {config.batch_size} must split into routing groups that '
                     f'split over the {shards} batch shards')
  if config.stage == 'aux' and not spec.aux_groups() and not mm.mod.enabled:
    raise ValueError(f"config.stage='aux' trains auxiliary routers, but groups="
                     f"{mm.groups!r} with router={mm.router!r} and no MoD has none")
  if config.stage == 'aux' and config.upcycle_from:
    raise ValueError("config.upcycle_from applies to the main stage, not stage='aux'")


def check_upcycle_source(src_dir: str) -> None:
  """`upcycle_from=DIR` must name a run directory holding a finished checkpoint
  (DIR/checkpoints/<step>/). Checked when an upcycled run starts (not by `validate`, so a
  run that already has its own checkpoints resumes even if DIR is gone)."""
  ckpt_dir = os.path.join(src_dir, 'checkpoints')
  if not os.path.isdir(src_dir):
    raise ValueError(f'config.upcycle_from={src_dir!r}: no such directory (give the workdir '
                     f'of a trained dense or 1t1i run)')
  steps = [d for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
  if not steps:
    raise ValueError(f'config.upcycle_from={src_dir!r} has no checkpoint (expected '
                     f'{ckpt_dir}/<step>/ written by train.py)')


def _validate_mot(config, sizes) -> None:
  from models import mot as mot_lib, transformer
  from moe import layer as moe_layer
  spec = transformer.mot_spec_from_config(config.model.mot)
  mot_lib.check_spec(spec)
  if spec.moe is not None:
    moe = config.model.mot.moe
    for key in ('num_experts', 'k', 'mlp_dim'):
      if not isinstance(moe[key], int) or moe[key] <= 0:
        raise ValueError(f'config.model.mot.moe.{key} must be a positive integer, got '
                         f'{moe[key]!r}')
    moe_layer.check_moe_spec(spec.moe, seq_len=config.seq_len, expert_shards=sizes['expert'])
