"""One run per workdir: `WORKDIR/lock`, held by process 0 of the job that trains there.

The lock is a small JSON file ({"host", "pid", "since", "processes"}) created atomically
(O_CREAT | O_EXCL): a second train.py on the same workdir is refused, naming the holder. A
lock whose holder is gone (same host, process no longer running) is stale: it is taken over
with a warning. A lock held from another host cannot be checked from here; it is refused,
naming the host, with what to do if that job is known to be dead (delete the file). The
other processes of a multi-process job do not take it: process 0 holds it for the job.
Released when the run ends, however it ends (a kill -9 leaves a stale lock, taken over by
the next run on the same host).

On an object store (`gs://`) the lock is the object WORKDIR/lock, created with a generation
precondition (GCS refuses the write if the object exists), so the same rules hold: a second
run is refused; a lock left by a dead process of this host is taken over. A job killed on
another host (a preempted TPU VM) leaves a lock no other host can check: delete
WORKDIR/lock (`gsutil rm`) before restarting elsewhere; the refusal says so.
"""

from __future__ import annotations

import json
import os
import socket
import time

from absl import logging

from training import storage

NAME = 'lock'


class WorkdirLocked(ValueError):
  """Another live run holds the workdir."""


def _alive(pid: int) -> bool:
  """Whether process `pid` runs on this host (a zombie counts as gone)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's live process
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except (OSError, IndexError):
    return True


def _describe(holder: dict) -> str:
  since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))
  return f"host {holder.get('host')}, pid {holder.get('pid')}, since {since}"


class WorkdirLock:
  """`with WorkdirLock(workdir, enabled=is_chief):` refuses (WorkdirLocked) if taken."""

  def __init__(self, workdir: str, *, enabled: bool = True, processes: int = 1):
    self.path = storage.join(workdir, NAME)
    self.enabled, self.processes = enabled, processes
    self._held = False

  def _read(self) -> dict | None:
    try:
      return json.loads(storage.read_text(self.path))
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # torn or unreadable: treated as held by an unknown, dead process

  def acquire(self) -> None:
    if not self.enabled:
      return
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'since': time.time(),
          'processes': self.processes}
    for _ in range(3):  # a stale lock removed, then created again
      if not storage.create_exclusive(self.path, json.dumps(me)):
        holder = self._read()
        if holder is None:
          continue  # released meanwhile
        if holder.get('pid') == os.getpid() and holder.get('host') == me['host']:
          self._held = False  # this process already holds it (an earlier stage)
          return
        if holder and (holder.get('host') != me['host'] or _alive(int(holder['pid']))):
          where = ('' if holder.get('host') == me['host'] else
                   f' (another host: if that job is dead, delete {self.path})')
          raise WorkdirLocked(f'{os.path.dirname(self.path)} is in use by another run '
                              f'({_describe(holder)}){where}; use another --workdir or '
                              'stop that run first')
        logging.warning('taking over the stale lock %s (%s: that process is gone)',
                        self.path, _describe(holder) if holder else 'unreadable')
        storage.remove(self.path)
        continue
      self._held = True
      return
    raise WorkdirLocked(f'cannot take the lock {self.path}: other runs keep taking it')

  def release(self) -> None:
    if self._held:
      self._held = False
      storage.remove(self.path)

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
