"""The training loop: config + workdir -> trained, checkpointed model and metrics.

    validate config -> mesh -> abstract state + shardings -> restore latest checkpoint from
    WORKDIR or init -> AOT-compile the step -> loop: batch -> step -> (log | check | save)

Guard rails: every step's loss is checked for NaN/Inf (lazily, in batches at log and save
points, so the host never stalls the device); the first bad step stops the run by name and
nothing after the last good check is saved. SIGTERM checkpoints the step reached and
returns normally (exit 0); with several processes all of them checkpoint the same step
(`_Preemption`). A workdir whose checkpoint holds another config is refused (`resume`).
"""

from __future__ import annotations

import functools
import math
import signal
import time

import jax
from absl import logging

from data import pipeline, tokenizer
from training import checkpoint, flops, metrics, sharding, state as state_lib, step as step_lib
from training import warm_start
from training.validate import validate


class NonFiniteLossError(FloatingPointError):
  pass


class _Preemption:
  """SIGTERM -> checkpoint at a step boundary and return.

  One process: a Python SIGTERM handler sets a flag that `check(step)` reads. Several
  processes: SIGTERM may reach only some of them, and all must save the same step (the save
  is collective), so the decision is collective too: JAX's preemption sync manager (started
  by jax.distributed.initialize, with its own SIGTERM handler, which ours must not replace)
  tells every process the first step after the notice that all can reach
  (`reached_preemption_sync_point`, called once per step). Without that manager the local
  flags are OR-ed over the processes at every step (a small all-gather).
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = jax.process_count() > 1
    self._sync = self._multi and self._sync_manager() is not None

  def __enter__(self):
    if self._sync:  # the sync manager's handler is installed; keep it
      return self
    def handler(signum, frame):
      logging.warning('SIGTERM received: checkpointing at the next step boundary.')
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. some test runners): no handler
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def check(self, step: int) -> bool:
    """Whether to checkpoint `step` and stop; call once per step, at every step."""
    if not self._multi:
      return self.requested
    from jax.experimental import multihost_utils
    if self._sync:
      reached = multihost_utils.reached_preemption_sync_point(step)
      if reached:
        logging.warning('preemption notice: all %d processes checkpoint step %d.',
                        jax.process_count(), step)
      return reached
    import numpy as np
    flags = multihost_utils.process_allgather(np.asarray(self.requested))
    return bool(np.any(flags))

  @staticmethod
  def _sync_manager():
    """JAX's preemption sync manager (set up by jax.distributed.initialize), or None."""
    try:
      from jax._src import distributed
      return distributed.global_state.preemption_sync_manager
    except (ImportError, AttributeError):
      return None


def check_finite(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  """Fetch pending per-step metrics; raise at the first step whose loss is not finite."""
  fetched = jax.device_get(pending)
  for step, m in fetched:
    if not math.isfinite(float(m['loss'])):
      raise NonFiniteLossError(
          f'loss is {float(m["loss"])} at step {step}: stopping. No checkpoint after the '
          f'last finite check was written; lower the learning rate or inspect the data.')
  return fetched


def run_steps(config, mesh, start: int, end: int, *, take_step, on_log, save) -> dict:
  """The step loop of both trainers (this file's and training/imp_loop.py's).

  `take_step(step)` runs step `step + 1` and returns its device metrics (with a 'loss').
  Every `log_every` steps and at `end` the metrics since the last log are checked for
  NaN/Inf (`check_finite`), then `on_log(step, rows)` -> the logged scalars. `save(step)`
  checkpoints every `checkpoint_every` steps, at `end` and after SIGTERM, which then stops
  the loop (`_Preemption`). -> the last logged scalars.
  """
  pending: list[tuple[int, dict]] = []  # per-step device metrics not yet checked
  interval: list[dict] = []  # host metrics since the last log row
  last: dict = {}
  step = start
  with jax.set_mesh(mesh), _Preemption() as preempt:
    while step < end:
      pending.append((step + 1, take_step(step)))
      step += 1
      preempted = preempt.check(step)  # once per step: the signal may land mid-iteration
      is_log = step % config.log_every == 0 or step == end
      is_save = step % config.checkpoint_every == 0 or step == end or preempted
      if is_log or is_save:
        interval += [m for _, m in check_finite(pending)]
        pending = []
      if is_log:
        last = on_log(step, interval)
        interval = []
      if is_save:
        save(step)
      if preempted:
        logging.warning('checkpointed step %d after SIGTERM; exiting.', step)
        break
  return last


def resume(ckpt, start: int, config, abstract, workdir: str, allow_config_change: bool):
  """-> (state, data iterator state) of checkpoint `start`, after checking its config."""
  changes = checkpoint.config_changes(ckpt.read_config(start), config)
  if changes and not allow_config_change:
    raise ValueError(
        f'{workdir} holds a run of another config (checkpoint step {start}): '
        + '; '.join(changes) + '. Use another --workdir, or pass --allow_config_change '
        'to resume it with this config.')
  if changes:
    logging.warning('resuming with a changed config (--allow_config_change): %s',
                    '; '.join(changes))
  logging.info('resuming from %s/%d (the newest complete checkpoint)', ckpt.directory,
               start)
  return ckpt.restore(start, abstract)


def train(config, workdir: str, *, stop_at: int | None = None,
          allow_config_change: bool = False) -> dict:
  """Train `config` in `workdir`, resuming from its latest checkpoint.

  `stop_at` ends this run early at that step (checkpointing it) without changing the
  schedule, e.g. to test resumption. A workdir whose checkpoint was written with another
  config (other than `checkpoint.RESUMABLE_KEYS`, e.g. the mesh) is refused unless
  `allow_config_change`. Returns the last logged scalars.
  """
  validate(config, jax.device_count())
  if config.model.family == 'imp':  # alternating gradient descent over tasks
    from training import imp_loop  # pylint: disable=import-outside-toplevel
    return imp_loop.train(config, workdir, stop_at=stop_at,
                          allow_config_change=allow_config_change)
  mesh = sharding.make_mesh(config.mesh)
  is_chief = jax.process_index() == 0
  logging.info('mesh %s over %d devices (%d processes)', dict(mesh.shape),
               jax.device_count(), jax.process_count())

  layout = state_lib.state_layout(config, mesh)
  main_workdir, workdir = workdir, warm_start.run_dir(config, workdir)
  stage = config.get('stage', 'main')
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.max_checkpoints)
  data_iter = pipeline.make_train_iterator(
      config.data, seq_len=config.seq_len, global_batch_size=config.batch_size,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())

  start = ckpt.latest_step()
  if start is not None:
    try:
      state, data_state = resume(ckpt, start, config, layout.abstract, workdir,
                                 allow_config_change)
    except Exception:
      ckpt.close()
      raise
    data_iter.set_state(data_state)
    start = int(start)
  elif stage == 'aux':
    state, _ = warm_start.aux_stage_state(config, layout, main_workdir)
    start = 0
  elif config.get('upcycle_from'):  # first start only: a resume reads its own checkpoint
    state, data_state, _ = warm_start.upcycle_state(config, layout)
    data_iter.set_state(data_state)
    start = 0
  else:
    state, start = state_lib.init_state(config, layout), 0
  n_params = state_lib.count_params(state['params'])
  logging.info('model: %s, %.2fM parameters', config.model.family, n_params / 1e6)

  names = tokenizer.MODALITIES
  step_fn = functools.partial(step_lib.train_step, graphdef=layout.graphdef, tx=layout.tx,
                              num_modalities=len(names), seed=config.seed, stage=stage)
  batch_sh = sharding.batch_sharding(mesh)
  jitted = jax.jit(step_fn, in_shardings=(layout.shardings, batch_sh),
                   out_shardings=(layout.shardings, None), donate_argnums=0)

  end = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
  schedule = state_lib.lr_schedule(config)  # for logging; the optimizer holds its own
  writer = metrics.MetricWriter(workdir, enabled=is_chief)
  spec = state_lib.model_spec(config)
  rates = metrics.Throughput(config.batch_size * config.seq_len,
                             flops.train_flops_per_step(spec, config.seq_len,
                                                        config.batch_size),
                             config.total_steps)
  compiled = None

  def take_step(step: int) -> dict:
    nonlocal state, compiled
    batch = sharding.shard_batch(next(data_iter), batch_sh)
    if compiled is None:
      t0 = time.perf_counter()
      compiled = jitted.lower(state, batch).compile()
      logging.info('compiled the train step in %.1fs', time.perf_counter() - t0)
    state, step_metrics = compiled(state, batch)
    if step == start:
      rates.start(step + 1)  # the first step's time includes dispatch warm-up
    return step_metrics

  def on_log(step: int, rows: list[dict]) -> dict:
    scalars = metrics.summarise(rows, names)
    scalars['train/lr'] = float(schedule(step - 1))
    if step > start + 1:
      scalars.update(rates.measure(step))
    writer.write(step, scalars)
    if is_chief:
      metrics.log_console(metrics.console_line(step, config.total_steps, scalars, names))
    return scalars

  def save(at: int) -> None:
    ckpt.save(at, state, data_iter.get_state(), config.to_json())

  try:
    return run_steps(config, mesh, start, end, take_step=take_step, on_log=on_log,
                     save=save)
  finally:
    ckpt.close()
    writer.close()
