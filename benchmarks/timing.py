"""Timing shared by the benchmark scripts: chained calls, so async dispatch cannot overlap
them, repeated so that each repeat lasts about a given time. Ratios, never absolute times,
are what the scripts report (see docs/benchmarks.md)."""

from __future__ import annotations

import time

import jax


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
