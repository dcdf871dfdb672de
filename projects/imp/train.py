"""IMP training: alternating gradient descent over tasks (configs/imp.py, SPEC.md §4).

    validate (projects/imp/validate.py) -> training/run.Run (mesh, state layout,
    checkpointer, writer) -> resume (params, optimizer, schedule and every task's data
    position) or init -> run_steps: task = schedule.next() -> its batch -> the step compiled
    for its signature -> (log | check | save)

`mode='agd'`: each step takes one batch of one task (`projects/imp/schedules.py` picks it) and
updates on that task's loss alone. One jitted step function; jax.jit compiles it once per
distinct input signature (e.g. the 32x32 and 16x16 classification batches are two), and
`train/compilations` counts them. With `agd.mask_updates` (default) a step changes only
the parameters the task's loss reaches (`models/imp_losses.task_modules`: of the classifier heads,
only the task's own): the others, and their
Adam moments, are left exactly as they were, so other tasks' heads and embedders get no
momentum or weight-decay drift. `mask_updates=False` updates everything (IMP's released
code). `mode='summed'`: every task's batch in every step, the weighted losses summed (the
baseline). The guard rails of training/run.py apply: NaN/Inf stops by step, SIGTERM
checkpoints the step reached, a workdir of another config is refused. It logs what the
decoder trainer logs: losses, the learning rate, step time, tokens/s (image patches and
text tokens of the step's batches), model FLOP/s (XLA's count of each compiled step) and
each compilation's time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx

from core import partitioning
from projects.imp import losses as imp_losses
from projects.imp import schedules as agd
from projects.imp import tasks as imp_tasks
from projects.imp.validate import task_heads, task_specs, validate
from training import metrics, state as state_lib
from training.run import Run, run_steps

def model_batch(kind: str, batch: dict) -> dict:
  """A projects/imp/tasks.py batch -> projects/imp/model.py's batch of `kind` (images to [-1, 1])."""
  out = {'image': batch['image'] * 2.0 - 1.0}
  if kind == 'classify':
    out['label'] = batch['label']
  elif kind == 'contrastive':
    out['text'], out['text_mask'] = batch['text'], batch['text_mask'] > 0
  else:
    out.update(imp_losses.caption_inputs(batch['text']))
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
  plain = {m for ms in imp_losses.TASK_MODULES.values() for m in ms if m != 'classifiers'}
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
      loss, m = imp_losses.task_loss(model, kinds[name], model_batch(kinds[name], batch),
                              jax.random.fold_in(rng, i), heads.get(name))
      total = total + weights[name] * loss
      out.update({f'{name}/{k}': v for k, v in m.items() if jnp.ndim(v) == 0})
    return total, out

  (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  if mask:
    modules = all_modules(nnx.merge(graphdef, state['params']).head_names())
    reached = tuple(sorted({m for n in batches for m in imp_losses.task_modules(kinds[n],
                                                                          heads.get(n))}))
    params = keep_unreached(params, state['params'], reached, modules)
    opt_state = keep_unreached(opt_state, state['opt_state'], reached, modules)
  out.update(loss=loss, grad_norm=optax.global_norm(grads))
  return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, out


def train(config, workdir: str, *, stop_at: int | None = None,
          allow_config_change: bool = False) -> dict:
  """Train configs/imp.py's `config` in `workdir` (resuming); -> the last logged scalars."""
  validate(config, jax.device_count())
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
  with Run(config, workdir, allow_config_change=allow_config_change) as run:
    layout = run.layout
    iters = {n: imp_tasks.make_task_iterator(
        n, t, config.data, seed=config.seed + i, process_index=jax.process_index(),
        process_count=jax.process_count()) for i, (n, t) in enumerate(tasks.items())}
    def set_data_state(data_state: dict) -> None:
      schedule.set_state(data_state['schedule'])
      for n, it in iters.items():
        it.set_state(data_state['tasks'][n])

    state, _, start = run.restore_or_init(
        lambda: (state_lib.init_state(config, layout), None), set_data_state=set_data_state)
    logging.info('IMP %s, schedule %s, tasks %s', mode, config.agd.schedule, kinds)

    counter: list = []
    step_fn = functools.partial(_step, graphdef=layout.graphdef, tx=layout.tx, kinds=kinds,
                                heads=task_heads(config), weights=weights,
                                mask=config.agd.mask_updates and mode == 'agd',
                                seed=config.seed, counter=counter)
    batch_sh = partitioning.batch_sharding(run.mesh)  # the batch axis of every input
    jitted = jax.jit(step_fn, in_shardings=(layout.shardings, batch_sh),
                     out_shardings=(layout.shardings, None), donate_argnums=0)
    end = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
    lr = state_lib.lr_schedule(config)  # for logging; the optimizer holds its own
    rates = metrics.Throughput(config.total_steps)
    compiled: dict = {}  # input signature -> (compiled step, its FLOPs)

    def take_step(step: int) -> dict:
      nonlocal state
      names = list(tasks) if mode == 'summed' else [schedule.next()]
      batches = {n: partitioning.shard_batch(next(iters[n]), batch_sh) for n in names}
      signature = tuple((n, tuple((k, v.shape) for k, v in sorted(b.items())))
                        for n, b in sorted(batches.items()))
      if signature not in compiled:
        step_ = run.compile(jitted, state, batches, what=f'the step of {"+".join(names)}')
        compiled[signature] = (step_, _flops(step_))
      step_, step_flops = compiled[signature]
      state, out = step_(state, batches)
      if step == start:
        rates.start(step + 1)  # the first step's time includes dispatch warm-up
      else:
        rates.count(sum(_tokens(kinds[n], b, config.model.imp.patch_size)
                        for n, b in batches.items()), step_flops)
      return out

    def on_log(step: int, rows: list[dict]) -> dict:
      scalars = _summarise(rows)
      scalars['train/compilations'] = len(counter)
      scalars['train/lr'] = float(lr(step - 1))
      if step > start + 1:
        scalars.update(rates.measure(step))
      run.writer.write(step, scalars)
      if run.is_chief:
        metrics.log_console(f'step {step}/{config.total_steps} ' + ' '.join(
            f'{k[6:]}={v:.4g}' for k, v in sorted(scalars.items()) if k.endswith('/loss')))
      return scalars

    def save(at: int) -> None:
      run.ckpt.save(at, state, {'schedule': schedule.state(),
                                'tasks': {n: it.get_state() for n, it in iters.items()}},
                    config.to_json())

    return run_steps(config, run.mesh, start, end, take_step=take_step, on_log=on_log,
                     save=save)


def _tokens(kind: str, batch: dict, patch: int) -> int:
  """Encoder tokens of one task batch: image patches (all images of a batch share a size)
  and, for contrastive and caption batches, text tokens."""
  b, h, w = batch['image'].shape[:3]
  text = batch['text'].shape[1] if kind != 'classify' else 0
  return b * ((h // patch) * (w // patch) + text)


def _flops(compiled) -> float:
  """XLA's FLOP count of a compiled step (0 where the backend gives none)."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float((analysis or {}).get('flops', 0.0))


def _summarise(rows: list[dict]) -> dict:
  """Mean of each metric over the steps that reported it: 'train/<task>/<metric>'."""
  sums: dict = {}
  for row in rows:
    for k, v in row.items():
      s = sums.setdefault(k, [0.0, 0])
      s[0] += float(v)
      s[1] += 1
  return {f'train/{k}': s / n for k, (s, n) in sums.items()}
