"""IMP's config checks: the shared ones, then tasks, heads, prompts and schedule, before
anything is built. Also the task tables both training and eval read."""

from __future__ import annotations

from projects.imp import model as imp
from projects.imp import schedules as agd
from projects.imp import tasks as imp_tasks
from training.validate import validate_common

MODES = ('agd', 'summed')


def task_specs(config) -> dict:
  return {name: config.tasks[name] for name in sorted(config.tasks)}


def task_heads(config) -> dict[str, str]:
  """{classification task: its classifier head (`head`, or the model's only one)}."""
  heads = list(config.model.imp.classifiers)
  return {n: t.get('head') or (heads[0] if len(heads) == 1 else '')
          for n, t in task_specs(config).items() if t.kind == 'classify'}


def validate(config, num_devices: int) -> tuple[int, ...]:
  """The shared checks (training/validate.py; no seq_len: each task has its own shapes),
  then IMP's: mode, tasks, heads, prompts, schedule. -> the resolved mesh shape."""
  shape, sizes = validate_common(config, num_devices, skip=('seq_len',))
  if config.agd.mode not in MODES:
    raise ValueError(f'config.agd.mode={config.agd.mode!r} is not one of {MODES}')
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
  for name, head in task_heads(config).items():  # every task checked above
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
  return shape
