"""What every trainer shares (the decoder trainer, training/loop.py; projects such as
projects/imp): the mesh and state layout, the checkpointer with resume-or-init, the metric
writer, compile-time logging, throughput, and the step loop with its guard rails.

Guard rails: every step's loss is checked for NaN/Inf (lazily, in batches at log and save
points, so the host never stalls the device); the first bad step stops the run by name and
nothing after the last good check is saved. SIGTERM and Ctrl-C (SIGINT) checkpoint the step
reached and return normally (exit 0); a second Ctrl-C stops at once; with several processes
all of them checkpoint the same step (`_Preemption`). A workdir whose checkpoint holds
another config is refused (`resume`); a workdir another live run holds is refused
(training/lock.py).
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Callable

import jax
from absl import logging

from core import partitioning
from training import checkpoint, lock as lock_lib, metrics, state as state_lib, storage


class NonFiniteLossError(FloatingPointError):
  pass


class _Preemption:
  """SIGTERM or SIGINT (Ctrl-C) -> checkpoint at a step boundary and return; a second SIGINT
  raises KeyboardInterrupt at once (nothing more is saved; the last checkpoint stays).

  One process: a Python handler sets a flag that `check(step)` reads. Several processes:
  the signal may reach only some of them, and all must save the same step (the save is
  collective), so the decision is collective too: JAX's preemption sync manager (started
  by jax.distributed.initialize, with its own SIGTERM handler, which ours must not replace)
  tells every process the first step after the notice that all can reach
  (`reached_preemption_sync_point`, called once per step); a Ctrl-C is turned into a
  SIGTERM to this process for it. Without that manager the local flags are OR-ed over the
  processes at every step (a small all-gather).
  """

  def __init__(self):
    self.requested = False
    self._previous: dict[int, object] = {}
    self._multi = jax.process_count() > 1
    self._sync = self._multi and self._sync_manager() is not None

  def _handler(self, signum, frame):
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now
    self.requested = True
    if signum == signal.SIGINT and self._sync:
      os.kill(os.getpid(), signal.SIGTERM)  # the sync manager's notice
    logging.warning('%s received: checkpointing at the next step boundary%s.', name,
                    ' (Ctrl-C again to stop at once)' if signum == signal.SIGINT else '')

  def __enter__(self):
    # With the sync manager its SIGTERM handler is installed; keep it.
    signums = (signal.SIGINT,) if self._sync else (signal.SIGTERM, signal.SIGINT)
    for signum in signums:
      try:
        self._previous[signum] = signal.signal(signum, self._handler)
      except ValueError:  # not the main thread (e.g. some test runners): no handler
        pass
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)

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
  """The step loop of both trainers (training/loop.py's and projects/imp/train.py's).

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
        logging.warning('checkpointed step %d after the stop signal; exiting.', step)
        break
  return last


def resume(ckpt, start: int, config, abstract, workdir: str, allow_config_change: bool):
  """-> (state, data iterator state) of checkpoint `start`, after checking its config."""
  _refuse_or_warn(
      checkpoint.config_changes(ckpt.read_config(start), config), allow_config_change,
      f'{workdir} holds a run of another config (checkpoint step {start}): {{}}. Use another '
      '--workdir, or pass --allow_config_change to resume it with this config.',
      'resuming')
  logging.info('resuming from %s/%d (the newest complete checkpoint)', ckpt.directory,
               start)
  return ckpt.restore(start, abstract)


def config_of_run(workdir: str, given=None, *, allow_config_change: bool = False):
  """The config to read the run in `workdir` with (eval and every other reader of a run):
  the one saved with its newest checkpoint. `given` (a --config) is used instead when it
  computes the same model on the same data: it may differ in RESUMABLE_KEYS (the eval
  keys, the mesh) and TRAINING_ONLY_KEYS (the schedule); any other difference is a
  ValueError naming the keys, unless `allow_config_change`. Creates nothing."""
  ckpt = checkpoint.Checkpointer(workdir, create=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {ckpt.directory}: train first (python '
                              f'train.py --config=... --workdir={workdir})')
    saved = ckpt.read_config(step)
  finally:
    ckpt.close()
  if given is None:
    return checkpoint.config_from_saved(saved)
  _refuse_or_warn(
      checkpoint.config_changes(saved, given,
                                checkpoint.RESUMABLE_KEYS + checkpoint.TRAINING_ONLY_KEYS),
      allow_config_change,
      f'--config is not the config {workdir} was trained with (checkpoint step {step}): {{}}. '
      'Leave out --config to use the saved one, or pass --allow_config_change to evaluate '
      'with this config anyway.', f'reading {workdir}')
  return given


def _refuse_or_warn(changes: list[str], allowed: bool, refusal: str, doing: str) -> None:
  """ValueError `refusal` (its {} = the changes) unless `allowed`; then only a warning."""
  if changes and not allowed:
    raise ValueError(refusal.format('; '.join(changes)))
  if changes:
    logging.warning('%s with a changed config (--allow_config_change): %s', doing,
                    '; '.join(changes))


def prepare_workdir(workdir: str) -> str:
  """Create `workdir` if needed; ValueError naming it when it cannot hold a run."""
  if not workdir:
    raise ValueError('--workdir is empty: give the run directory, e.g. --workdir=runs/mine')
  if storage.is_remote(workdir):
    return _prepare_remote(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir={workdir} is a file, not a directory')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f'cannot create --workdir={workdir}: {e.strerror}') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f'--workdir={workdir} is not writable')
  return workdir


def _prepare_remote(workdir: str) -> str:
  """An object-store workdir: its bucket must exist and be reachable; nothing to create."""
  bucket = '/'.join(workdir.split('/')[:3])
  try:
    found = storage.isdir(bucket)
    is_file = storage.isfile(workdir)
  except Exception as e:  # pylint: disable=broad-except  (auth, network: one line)
    raise ValueError(f'cannot reach --workdir={workdir}: {type(e).__name__}: '
                     f'{str(e).strip().splitlines()[0][:200] if str(e).strip() else ""}'
                     ) from None
  if not found:
    raise ValueError(f'--workdir={workdir}: bucket {bucket} does not exist (or is not '
                     'visible with these credentials)')
  if is_file:
    raise ValueError(f'--workdir={workdir} is an object (a file), not a directory')
  return workdir


class Run:
  """A run's shared pieces in WORKDIR: `mesh`, `layout` (training/state.py), `lock`
  (training/lock.py), `ckpt`, `writer` (once `restore_or_init` has succeeded);
  `restore_or_init` and `compile`. Close it (`with Run(...) as run:`)."""

  def __init__(self, config, workdir: str, *, allow_config_change: bool = False):
    self.config, self.workdir = config, workdir
    self.allow_config_change = allow_config_change
    self.mesh = partitioning.make_mesh(config.mesh)
    self.is_chief = jax.process_index() == 0
    logging.info('mesh %s over %d devices (%d processes)', dict(self.mesh.shape),
                 jax.device_count(), jax.process_count())
    self.layout = state_lib.state_layout(config, self.mesh)
    if self.is_chief:
      prepare_workdir(workdir)
    self.lock = lock_lib.WorkdirLock(workdir, enabled=self.is_chief,
                                     processes=jax.process_count())
    self.lock.acquire()
    self.writer = None  # opened by restore_or_init: a refused workdir gets no new file
    try:
      self.ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.max_checkpoints)
    except BaseException:
      self.lock.release()
      raise

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    try:
      try:
        self.ckpt.close()
      except checkpoint.CheckpointError:
        if exc_type is None:
          raise
        # the run is already stopping with its own error, usually the same one
      if self.writer is not None:
        self.writer.close()
    finally:
      self.lock.release()

  def restore_or_init(self, init: Callable[[], tuple],
                      set_data_state: Callable[[dict], None] | None = None) -> tuple:
    """-> (state, data state or None, start step): the newest complete checkpoint in
    WORKDIR (its config checked, `resume`), else `init()` -> (state, data state or None).
    `set_data_state(data state)` then restores the input pipeline (a state it cannot take
    is a CheckpointError naming the step). Only then is the writer opened: metrics.jsonl
    keeps the rows up to the start step (training/metrics.py)."""
    start = self.ckpt.latest_step()
    if start is not None:
      state, data_state = resume(self.ckpt, start, self.config, self.layout.abstract,
                                 self.workdir, self.allow_config_change)
      start = int(start)
    else:
      (state, data_state), start = init(), 0
    if data_state is not None and set_data_state is not None:
      self._set_data_state(lambda: set_data_state(data_state), start)
    logging.info('model: %s, %.2fM parameters', self.config.model.family,
                 state_lib.count_params(state['params']) / 1e6)
    self.writer = metrics.MetricWriter(self.workdir, enabled=self.is_chief, resume_step=start)
    return state, data_state, start

  def _set_data_state(self, set_state: Callable[[], None], start: int) -> None:
    """`set_state()` restores the input pipeline's position read from checkpoint `start`;
    a state it cannot take (a corrupted or hand-edited `data` item) is one CheckpointError
    naming the step directory."""
    try:
      set_state()
    except Exception as e:  # pylint: disable=broad-except  # Grain / IMP iterators
      raise checkpoint.CheckpointError(
          f'the data-iterator state in {self.ckpt.step_dir(start)}/data cannot be restored '
          f'({type(e).__name__}: {str(e)[:200]}). It is left as it is: move that step away '
          f'to resume from an earlier one (steps here: {self.ckpt.all_steps()}), or use '
          'another --workdir.') from None

  @staticmethod
  def compile(jitted, *args, what: str = 'the train step'):
    """AOT-compile `jitted` for `args`, logging the time it took."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    logging.info('compiled %s in %.1fs', what, time.perf_counter() - t0)
    return compiled
