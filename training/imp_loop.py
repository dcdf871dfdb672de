"""IMP training: alternating gradient descent over tasks (configs/imp.py, SPEC.md §4).

    validate -> mesh -> model + optimizer layout -> resume (params, optimizer, schedule and
    every task's data position) or init -> loop.run_steps: task = schedule.next() -> its
    batch -> the jitted step -> (log | check | save)

`mode='agd'`: each step takes one batch of one task (`training/agd.py` picks it) and
updates on that task's loss alone. One jitted step function; jax.jit compiles it once per
distinct input signature (e.g. the 32x32 and 16x16 classification batches are two), and
`train/compilations` counts them. With `agd.mask_updates` (default) a step changes only
the parameters the task's loss reaches (`models/imp.task_modules`: of the classifier heads,
only the task's own): the others, and their
Adam moments, are left exactly as they were, so other tasks' heads and embedders get no
momentum or weight-decay drift. `mask_updates=False` updates everything (IMP's released
code). `mode='summed'`: every task's batch in every step, the weighted losses summed (the
baseline). The guard rails of training/loop.py apply: NaN/Inf stops by step, SIGTERM
checkpoints the step reached, a workdir of another config is refused.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from data import imp_tasks
from models import imp
from training import agd, checkpoint, metrics, sharding, state as state_lib
from training import loop as loop_lib

MODES = ('agd', 'summed')


def task_specs(config) -> dict:
  return {name: config.tasks[name] for name in sorted(config.tasks)}


def task_heads(config) -> dict[str, str]:
  """{classification task: its classifier head (`head`, or the model's only one)}."""
  heads = list(config.model.imp.classifiers)
  return {n: t.get('head') or (heads[0] if len(heads) == 1 else '')
          for n, t in task_specs(config).items() if t.kind == 'classify'}


def model_batch(kind: str, batch: dict) -> dict:
  """A data/imp_tasks.py batch -> models/imp.py's batch of `kind` (images to [-1, 1])."""
  out = {'image': batch['image'] * 2.0 - 1.0}
  if kind == 'classify':
    out['label'] = batch['label']
  elif kind == 'contrastive':
    out['text'], out['text_mask'] = batch['text'], batch['text_mask'] > 0
  else:
    out.update(imp.caption_inputs(batch['text']))
    out['text_mask'] = batch['text_mask'][:, :-1] > 0
  return out


def keep_unreached(new, old, reached: tuple[str, ...], modules: tuple[str, ...]):
  """Leaves under a model module not in `reached` take `old`; everything else `new`.
  A module is a path of keys ('encoder', 'classifiers/shapes'). Works for params and for
  optimizer states holding params-shaped trees (Adam moments)."""
  parts = [(m, m.split('/')) for m in modules]

  def pick(path, n, o):
    names = [str(getattr(k, 'key', '')) for k in path]
    module = next((m for i in range(len(names)) for m, p in parts
                   if names[i:i + len(p)] == p), None)
    return n if module is None or module in reached else o
  return jax.tree_util.tree_map_with_path(pick, new, old)


def all_modules(head_names) -> tuple[str, ...]:
  """Every module a task can reach, each classifier head its own."""
  plain = {m for ms in imp.TASK_MODULES.values() for m in ms if m != 'classifiers'}
  return tuple(sorted(plain | {f'classifiers/{h}' for h in head_names}))


def _step(state, batches, *, graphdef, tx, kinds: dict, heads: dict, weights: dict,
          mask: bool, seed: int, counter: list):
  """One optimizer step on `batches` ({task: batch}); the loss is their weighted sum.
  `heads`: each classification task's classifier head."""
  counter.append(1)  # runs once per trace, i.e. per compilation
  rng = jax.random.fold_in(jax.random.key(seed), state['step'])

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    total, out = 0.0, {}
    for i, (name, batch) in enumerate(sorted(batches.items())):
      loss, m = imp.task_loss(model, kinds[name], model_batch(kinds[name], batch),
                              jax.random.fold_in(rng, i), heads.get(name))
      total = total + weights[name] * loss
      out.update({f'{name}/{k}': v for k, v in m.items() if jnp.ndim(v) == 0})
    return total, out

  (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  if mask:
    modules = all_modules(nnx.merge(graphdef, state['params']).head_names())
    reached = tuple(sorted({m for n in batches for m in imp.task_modules(kinds[n],
                                                                          heads.get(n))}))
    params = keep_unreached(params, state['params'], reached, modules)
    opt_state = keep_unreached(opt_state, state['opt_state'], reached, modules)
  out.update(loss=loss, grad_norm=optax.global_norm(grads))
  return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, out


def train(config, workdir: str, *, stop_at: int | None = None,
          allow_config_change: bool = False) -> dict:
  """Train configs/imp.py's `config` in `workdir` (resuming); -> the last logged scalars."""
  mesh = sharding.make_mesh(config.mesh)
  tasks = task_specs(config)
  kinds = {n: t.kind for n, t in tasks.items()}
  mode = config.agd.mode
  weights = ({n: float(t.weight) for n, t in tasks.items()} if mode == 'summed'
             else {n: 1.0 for n in tasks})
  schedule = agd.make_schedule(config.agd.schedule, [
      agd.Task(n, weight=float(t.weight), interval=int(t.interval))
      for n, t in tasks.items()], seed=config.seed)
  for n, head in task_heads(config).items():  # before compiling: labels out of range
    names = imp_tasks.class_names(config.data, tasks[n])
    classes = config.model.imp.classifiers[head]
    if names and len(names) > classes:
      dataset = imp_tasks.task_data_config(config.data, tasks[n]).tfds_name
      raise ValueError(f'task {n!r}: dataset {dataset!r} has {len(names)} classes, more '
                       f'than its head model.imp.classifiers.{head}={classes}')
  layout = state_lib.state_layout(config, mesh)
  iters = {n: imp_tasks.make_task_iterator(
      n, t, config.data, seed=config.seed + i, process_index=jax.process_index(),
      process_count=jax.process_count()) for i, (n, t) in enumerate(tasks.items())}
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.max_checkpoints)
  start = ckpt.latest_step()
  if start is not None:
    try:
      state, data_state = loop_lib.resume(ckpt, start, config, layout.abstract, workdir,
                                          allow_config_change)
    except Exception:
      ckpt.close()
      raise
    schedule.set_state(data_state['schedule'])
    for n, it in iters.items():
      it.set_state(data_state['tasks'][n])
    start = int(start)
  else:
    state, start = state_lib.init_state(config, layout), 0
  logging.info('IMP %s, schedule %s, tasks %s; %.2fM parameters', mode,
               config.agd.schedule, kinds, state_lib.count_params(state['params']) / 1e6)

  counter: list = []
  step_fn = functools.partial(_step, graphdef=layout.graphdef, tx=layout.tx, kinds=kinds,
                              heads=task_heads(config), weights=weights,
                              mask=config.agd.mask_updates and mode == 'agd',
                              seed=config.seed, counter=counter)
  jitted = jax.jit(step_fn, out_shardings=(layout.shardings, None), donate_argnums=0)
  batch_sh = NamedSharding(mesh, P(sharding.BATCH_AXES))

  def put(batch):
    return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in batch.items()}

  end = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
  writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0)
  timer = {'t': time.perf_counter(), 'step': start}

  def take_step(step: int) -> dict:
    del step  # the schedule keeps its own position
    nonlocal state
    names = list(tasks) if mode == 'summed' else [schedule.next()]
    state, out = jitted(state, {n: put(next(iters[n])) for n in names})
    return out

  def on_log(step: int, rows: list[dict]) -> dict:
    scalars = _summarise(rows)
    now = time.perf_counter()
    scalars['train/compilations'] = len(counter)
    scalars['perf/step_time_s'] = (now - timer['t']) / (step - timer['step'])  # + compiles
    timer.update(t=now, step=step)
    writer.write(step, scalars)
    if jax.process_index() == 0:
      metrics.log_console(f'step {step}/{config.total_steps} ' + ' '.join(
          f'{k[6:]}={v:.4g}' for k, v in sorted(scalars.items()) if k.endswith('/loss')))
    return scalars

  def save(at: int) -> None:
    ckpt.save(at, state, {'schedule': schedule.state(),
                          'tasks': {n: it.get_state() for n, it in iters.items()}},
              config.to_json())

  try:
    return loop_lib.run_steps(config, mesh, start, end, take_step=take_step, on_log=on_log,
                              save=save)
  finally:
    ckpt.close()
    writer.close()


def _summarise(rows: list[dict]) -> dict:
  """Mean of each metric over the steps that reported it: 'train/<task>/<metric>'."""
  sums: dict = {}
  for row in rows:
    for k, v in row.items():
      s = sums.setdefault(k, [0.0, 0])
      s[0] += float(v)
      s[1] += 1
  return {f'train/{k}': s / n for k, (s, n) in sums.items()}
