"""Datasets on an object store (`data.data_dir=gs://bucket/tfds`): the dataset's directory
is mirrored to a local cache on first use and read from there, on every host. ArrayRecord
reads records at random, one object-store request each: read in place, a run crawls (a
local GCS emulator gave no step in 10 minutes).

The cache is `$MMOE_DATA_CACHE` (default `~/.cache/mmoe/data`) / <bucket>/<path>/<name>/;
a file is copied when it is missing or has another size, written beside its destination
and renamed, so processes of one host may mirror at once and an interrupted copy is redone.
"""

from __future__ import annotations

import os
import shutil

from absl import logging
from etils import epath

CACHE_ENV = 'MMOE_DATA_CACHE'
REMOTE_PREFIXES = ('gs://',)


def is_remote(path: str) -> bool:
  return str(path).startswith(REMOTE_PREFIXES)


def cache_root() -> str:
  return os.path.abspath(os.path.expanduser(
      os.environ.get(CACHE_ENV) or '~/.cache/mmoe/data'))


def local_mirror(data_dir: str, tfds_name: str) -> str:
  """The local data dir that holds a current copy of `data_dir`/<name>/ (all versions)."""
  name = tfds_name.split(':')[0].split('/')[0]
  src = epath.Path(data_dir) / name
  scheme, rest = str(data_dir).split('://', 1)
  local = os.path.join(cache_root(), scheme, rest.strip('/'))
  url = lambda root: epath.Path(  # noqa: E731  (walk gives roots without the scheme)
      str(root) if '://' in str(root) else f'{scheme}://{root}')
  try:
    files = [url(root) / n for root, _, names in src.walk() for n in names]
  except Exception as e:  # pylint: disable=broad-except  (auth, network: one line)
    raise ValueError(f'data.data_dir={data_dir}: cannot list {src} ({type(e).__name__}: '
                     f'{str(e)[:200]})') from None
  if not files:
    raise ValueError(f'data.data_dir={data_dir}: nothing under {src} (prepare the dataset '
                     'locally, then copy its directory there)')
  copied = 0
  for f in files:
    dst = os.path.join(local, name, str(f)[len(str(src)) + 1:])
    size = f.stat().length
    if os.path.exists(dst) and os.path.getsize(dst) == size:
      continue
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f'{dst}.tmp{os.getpid()}'
    with f.open('rb') as r, open(tmp, 'wb') as w:
      shutil.copyfileobj(r, w, 1 << 24)
    os.replace(tmp, dst)
    copied += 1
  if copied:
    logging.info('mirrored %d file(s) of %s to %s', copied, src, os.path.join(local, name))
  return local
