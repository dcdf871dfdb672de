"""Timing shared by the benchmark scripts: chained calls, so async dispatch cannot overlap
them, repeated so that each repeat lasts about a given time, and the train step built as
training/loop.py builds it. Ratios, never absolute times, are what the scripts report (see
docs/benchmarks.md)."""

from __future__ import annotations

import functools
import time

import jax

from core import partitioning
from data import tokenizer
from training import state as state_lib, step as step_lib


class Timer:
  """Times chained calls `carry = step(carry)`; calls wait on each other through `carry`,
  so async dispatch cannot overlap them."""

  def __init__(self, step, carry):
    self.step, self.carry, self.calls = step, carry, 1

  def warm_up(self, warmup: int, repeat_seconds: float) -> None:
    """Untimed calls; then pick the calls per repeat so one lasts about repeat_seconds."""
    one = []
    for _ in range(max(1, warmup)):
      t0 = time.perf_counter()
      self.carry = jax.block_until_ready(self.step(self.carry))
      one.append(time.perf_counter() - t0)
    self.calls = max(1, round(repeat_seconds / min(one)))

  def repeat(self) -> float:
    """Seconds per call, averaged over one repeat of `self.calls` calls."""
    t0 = time.perf_counter()
    for _ in range(self.calls):
      self.carry = self.step(self.carry)
    jax.block_until_ready(self.carry)
    return (time.perf_counter() - t0) / self.calls


def compile_step(config, mesh, batch=None):
  """The train step of `config` as training/loop.py builds it (sharded init on `mesh`, the
  same jit with shardings and donation), AOT-compiled for `batch` (a host batch; default
  tests.helpers.random_batch). -> (Timer stepping the state on that batch, compiled step,
  batch sharding, {'params', 'compile_s'})."""
  from tests.helpers import random_batch  # pylint: disable=import-outside-toplevel
  layout = state_lib.state_layout(config, mesh)
  state = state_lib.init_state(config, layout)
  batch_sh = partitioning.batch_sharding(mesh)
  if batch is None:
    batch = random_batch(config.batch_size // jax.process_count(), config.seq_len, seed=0)
  batch = partitioning.shard_batch(batch, batch_sh)
  step_fn = functools.partial(step_lib.train_step, graphdef=layout.graphdef, tx=layout.tx,
                              num_modalities=len(tokenizer.MODALITIES))
  with jax.set_mesh(mesh):
    jitted = jax.jit(step_fn, in_shardings=(layout.shardings, batch_sh),
                     out_shardings=(layout.shardings, None), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
  info = {'params': state_lib.count_params(state['params']), 'compile_s': compile_s}
  return Timer(lambda s: compiled(s, batch)[0], state), compiled, batch_sh, info
