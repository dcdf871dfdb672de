"""Timing shared by the benchmark scripts: chained calls, so async dispatch cannot overlap
them, repeated so that each repeat lasts about a given time, and the train step built as
training/loop.py builds it. Ratios, never absolute times, are what the scripts report (see
docs/benchmarks.md)."""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp

from core import partitioning
from core.layers import dtype_of
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


def jit_step(layout, mesh):
  """The train step of `layout` jitted as training/loop.py jits it on `mesh` (shardings of
  the state and batch, donated state). -> (jitted step, batch sharding)."""
  batch_sh = partitioning.batch_sharding(mesh)
  step_fn = functools.partial(step_lib.train_step, graphdef=layout.graphdef, tx=layout.tx,
                              num_modalities=len(tokenizer.MODALITIES))
  with jax.set_mesh(mesh):
    jitted = jax.jit(step_fn, in_shardings=(layout.shardings, batch_sh),
                     out_shardings=(layout.shardings, None), donate_argnums=0)
  return jitted, batch_sh


def compile_step(config, mesh, batch=None):
  """The train step of `config` as training/loop.py builds it (sharded init on `mesh`, the
  same jit with shardings and donation: `jit_step`), AOT-compiled for `batch` (a host batch;
  default tests.helpers.random_batch). -> (Timer stepping the state on that batch, compiled
  step, batch sharding, {'params', 'compile_s'})."""
  from tests.helpers import random_batch  # pylint: disable=import-outside-toplevel
  layout = state_lib.state_layout(config, mesh)
  state = state_lib.init_state(config, layout)
  jitted, batch_sh = jit_step(layout, mesh)
  if batch is None:
    batch = random_batch(config.batch_size // jax.process_count(), config.seq_len, seed=0)
  batch = partitioning.shard_batch(batch, batch_sh)
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
  info = {'params': state_lib.count_params(state['params']), 'compile_s': compile_s}
  return Timer(lambda s: compiled(s, batch)[0], state), compiled, batch_sh, info


def matmul_timer(n: int, dtype_name: str) -> Timer:
  """The chain x <- x @ w of N x N matrices (w orthogonal: values stay finite), with
  `dtype_name` inputs and float32 accumulation, AOT-compiled on the default device."""
  dtype = dtype_of(dtype_name)
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (n, n), jnp.float32).astype(dtype)
  w = jnp.linalg.qr(jax.random.normal(kw, (n, n), jnp.float32))[0].astype(dtype)
  mm = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(dtype))
  mm = mm.lower(x, w).compile()
  return Timer(lambda x: mm(x, w), x)


def matmul_ratio(pairs, flops_per_step: float, matmul_flops: float) -> float:
  """Median over repeats of (step FLOP/s) / (matmul FLOP/s), `pairs` the (seconds per step,
  seconds per matmul) of each repeat, `matmul_flops` the matmul's FLOPs times the devices
  the step runs on: a load change within a repeat hits both sides alike."""
  return statistics.median((flops_per_step / t) / (matmul_flops / m) for t, m in pairs)
