"""Metric sinks: `WORKDIR/metrics.jsonl` (one JSON object per logged step), TensorBoard
event files (tensorboardX) in `WORKDIR/tb/`, and a console line. Only process 0 writes.

Also turns the per-step device metrics of a log interval into logged scalars.
"""

from __future__ import annotations

import json
import logging as logging_std
import math
import os
import time

import numpy as np
from absl import logging

from training import storage


class MetricWriter:
  """Appends rows to metrics.jsonl and TensorBoard; a no-op on processes other than 0.

  `resume_step`: the step the run starts from. Rows logged past it by an earlier run (the
  steps after its last checkpoint, which this run repeats) are dropped, and a last line
  torn by a kill is cut off, so every step appears once and each line is whole.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self.path = storage.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      storage.makedirs(workdir)
      if resume_step is not None:
        _keep_rows_up_to(self.path, resume_step)
      from tensorboardX import SummaryWriter  # heavy import, only where used
      self._tb = SummaryWriter(storage.join(workdir, 'tb'))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
    try:
      storage.append_text(self.path, json.dumps(row) + '\n')
    except OSError as e:  # a failed write names no file: name ours (disk full, read-only)
      raise OSError(e.errno, e.strerror, e.filename or self.path) from e
    for k, v in scalars.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    try:
      self._tb.flush()
    except OSError as e:
      raise OSError(e.errno, e.strerror, e.filename or os.path.dirname(self.path)) from e

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None  # its gs:// writer flushes again when collected: now, not at exit


def _jsonable(v):
  v = float(v) if isinstance(v, (np.floating, np.integer)) else v
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/Inf
  return v


def _parse_lines(path: str) -> tuple[list[tuple[int, dict]], list[int], bool]:
  """-> ([(line number, row)], numbers of bad lines, whether the last line is torn)."""
  text = storage.read_text(path)
  rows, bad = [], []
  lines = text.split('\n')
  torn = bool(lines[-1])  # no newline after the last line: cut by a kill mid-write
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or not isinstance(row.get('step'), int):
        raise ValueError
      rows.append((i, row))
    except ValueError:
      bad.append(i)
  return rows, bad, torn


def _keep_rows_up_to(path: str, step: int) -> None:
  """Rewrite `path` (atomically) with its whole rows of steps <= `step`."""
  if not storage.exists(path):
    return
  rows, bad, torn = _parse_lines(path)
  keep = [row for _, row in rows if row['step'] <= step]
  if len(keep) == len(rows) and not bad and not torn:
    return
  storage.write_text(path, ''.join(json.dumps(row) + '\n' for row in keep))
  logging.warning('%s: kept the %d rows up to step %d (dropped %d rows past it, %d bad '
                  'lines%s)', path, len(keep), step, len(rows) - len(keep), len(bad),
                  ', the last one torn' if torn else '')


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl's rows; a line that is not a row is skipped with a warning naming it."""
  path = storage.join(workdir, 'metrics.jsonl')
  if not storage.exists(path):
    return []
  rows, bad, _ = _parse_lines(path)
  if bad:
    logging.warning('%s: skipped line(s) %s: not a metrics row', path,
                    ', '.join(map(str, bad[:10])) + (' ...' if len(bad) > 10 else ''))
  return [row for _, row in rows]


def summarise(step_metrics: list[dict], modality_names) -> dict[str, float]:
  """Host-side per-step metric dicts of one log interval -> logged scalars.

  Token-weighted: per-modality loss = sum of token losses / number of tokens over the
  interval; everything else is the mean over the interval's steps.
  """
  out = {}
  loss_sum = sum(np.asarray(m['loss_sum']) for m in step_metrics)
  correct = sum(np.asarray(m['correct']) for m in step_metrics)
  count = sum(np.asarray(m['count']) for m in step_metrics)
  out['train/loss'] = float(np.mean([m['loss'] for m in step_metrics]))
  for i, name in enumerate(modality_names):
    if count[i] > 0:
      out[f'train/loss/{name}'] = float(loss_sum[i] / count[i])
      out[f'train/accuracy/{name}'] = float(correct[i] / count[i])
  skip = {'loss', 'loss_sum', 'correct', 'count'}
  for key in step_metrics[-1]:
    if key in skip:
      continue
    mean = np.mean([np.asarray(m[key]) for m in step_metrics], axis=0)
    name = f"train/{key.removeprefix('aux/')}"
    if mean.ndim == 0:
      out[name] = float(mean)
    else:  # per-expert vectors: one scalar per entry
      out.update({f'{name}/{i}': float(v) for i, v in enumerate(mean.reshape(-1))})
  return out


class Throughput:
  """Wall-clock rates between log points (steps after compilation only). Steps of one size
  give `tokens_per_step` / `flops_per_step`; steps that differ (IMP's tasks) `count` each."""

  def __init__(self, total_steps: int, *, tokens_per_step: int = 0,
               flops_per_step: float = 0.0):
    self.total_steps = total_steps
    self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
    self._t, self._step, self._tokens, self._flops = None, None, 0.0, 0.0

  def start(self, step: int) -> None:
    self._t, self._step, self._tokens, self._flops = time.perf_counter(), step, 0.0, 0.0

  def count(self, tokens: float, flops: float) -> None:
    """One step of its own size (since the last `measure`)."""
    self._tokens += tokens
    self._flops += flops

  def measure(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps = max(step - self._step, 1)
    elapsed = now - self._t
    tokens = self._tokens or self.tokens_per_step * steps
    flops = self._flops or self.flops_per_step * steps
    self.start(step)
    self._t = now
    dt = elapsed / steps
    return {'perf/step_time_s': dt,
            'perf/tokens_per_s': tokens / elapsed,
            'perf/model_flops_per_s': flops / elapsed,
            'perf/eta_s': dt * (self.total_steps - step)}


def console_line(step: int, total: int, scalars: dict[str, float], modality_names) -> str:
  parts = [f'step {step}/{total}', f"loss {scalars['train/loss']:.4f}"]
  parts += [f"{n} {scalars[f'train/loss/{n}']:.3f}" for n in modality_names
            if f'train/loss/{n}' in scalars]
  if 'perf/tokens_per_s' in scalars:
    eta = scalars['perf/eta_s']
    parts += [f"{scalars['perf/tokens_per_s']:,.0f} tok/s",
              f"{scalars['perf/model_flops_per_s'] / 1e12:.3f} TFLOP/s",
              f'ETA {int(eta // 60)}m{int(eta % 60):02d}s']
  return ' | '.join(parts)


def log_console(line: str) -> None:
  logging.info('%s', line)


class _LibraryInfoFilter(logging_std.Filter):
  """Drops INFO chatter from libraries (Orbax logs ~40 lines per save); keeps warnings,
  except the tracebacks Orbax's background threads and asyncio log for a full disk (one per
  array): the run stops with one line saying so (training/checkpoint.py)."""

  NOISY = ('/orbax/', '/grain/', '/tensorflow_datasets/', '/array_record/')
  DISK_FULL = ('No space left on device', 'RESOURCE_EXHAUSTED: Error writing',
               'Event loop is closed')

  def filter(self, record):
    noisy = any(s in record.pathname for s in self.NOISY) or record.name == 'asyncio'
    if noisy and record.levelno >= logging_std.ERROR:
      text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else '')
      return not any(s in text for s in self.DISK_FULL)
    return record.levelno >= logging_std.WARNING or not noisy


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
