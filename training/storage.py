"""Where a run's files live: a local directory or an object store (`gs://bucket/path`).

Everything that reads or writes under a workdir (checkpoints, metrics.jsonl, eval.json,
plots, the lock) goes through these functions, over `etils.epath` paths (gcsfs for gs://),
so a `--workdir=gs://...` works wherever a local one does. Where object stores differ:

  directories   implicit: `makedirs` makes nothing; a prefix "exists" once an object lies
                under it.
  append        unsupported by GCS (gcsfs's mode 'a' silently overwrites): `append_text`
                reads the object and writes it back whole.
  atomic write  every object write is atomic on GCS; a local file is written beside its
                destination and renamed over it.
  exclusive     `create_exclusive`: O_CREAT | O_EXCL locally, a generation precondition
                (create only if no object exists) on GCS.
  free space    only local directories have one (`free_bytes` is None on object stores).
"""

from __future__ import annotations

import os
import shutil

from etils import epath

from data.remote import REMOTE_PREFIXES, is_remote  # noqa: F401  (the one list of schemes)


def resolve(path: str) -> str:
  """An absolute local path, or an object-store URL as it is (os.path.abspath would turn
  'gs://b/run' into './gs:/b/run')."""
  path = str(path)
  return path.rstrip('/') if is_remote(path) else os.path.abspath(path)


def join(*parts: str) -> str:
  return os.path.join(*(str(p) for p in parts))


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def isfile(path: str) -> bool:
  return epath.Path(path).is_file()


def listdir(path: str) -> list[str]:
  """Names under `path` ([] if there is nothing)."""
  p = epath.Path(path)
  return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def makedirs(path: str) -> None:
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def write_text(path: str, text: str) -> None:
  """Write `path` whole, atomically: readers see the old or the new content."""
  if is_remote(path):
    epath.Path(path).write_text(text)
    return
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_bytes(path: str, data: bytes) -> None:
  epath.Path(path).write_bytes(data)


def append_text(path: str, text: str) -> None:
  """Append to a local file; rewrite an object whole (object stores cannot append)."""
  if not is_remote(path):
    with open(path, 'a') as f:
      f.write(text)
    return
  p = epath.Path(path)
  p.write_text((p.read_text() if p.exists() else '') + text)


def remove(path: str) -> None:
  """Remove a file or object; nothing if it is gone already."""
  try:
    epath.Path(path).unlink()
  except FileNotFoundError:
    pass


def rename(src: str, dst: str) -> None:
  """A file or a directory (on an object store: every object under the prefix, copied then
  deleted; not atomic there)."""
  if not is_remote(src):
    os.rename(src, dst)
    return
  fs = _gcs()
  fs.copy(src, dst, recursive=True)
  fs.rm(src, recursive=True)


def _gcs():
  import gcsfs  # pylint: disable=import-outside-toplevel  (only for object stores)
  return gcsfs.GCSFileSystem()


def create_exclusive(path: str, text: str) -> bool:
  """Create `path` holding `text` only if it does not exist; False if it does."""
  if is_remote(path):
    fs = _gcs()
    try:  # mode 'create': GCS's ifGenerationMatch=0, refused if any object exists there
      fs.pipe_file(path, text.encode(), mode='create')
    except FileExistsError:
      return False
    except Exception as e:  # pylint: disable=broad-except
      if 'precondition' in str(e).lower() or '412' in str(e):
        return False
      raise
    return True
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    f.write(text)
  return True


def tree_bytes(path: str) -> int:
  """Total size of the files under a local directory (0 on object stores)."""
  if is_remote(path):
    return 0
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


def free_bytes(path: str) -> int | None:
  """Free space of a local directory's filesystem; None on object stores."""
  return None if is_remote(path) else shutil.disk_usage(path).free
