"""What the entry points (train.py, eval.py) print when a run cannot go on: one line on
stderr naming the key, path or port at fault, and exit status 1, for every failure a user
can cause (a config, a path, a disk, a port, a checkpoint). Bugs keep their traceback.
"""

from __future__ import annotations

import errno
import re
import sys
import threading

from absl import flags

# Raised by the project for bad input: config checks, checkpoints that do not fit or cannot
# be read, a locked workdir, a non-finite loss, a floor violation (all ValueError or
# FloatingPointError subclasses).
USER_ERRORS = (ValueError, FloatingPointError, FileNotFoundError)


def describe_os_error(e: OSError) -> str:
  """An OSError as 'what: path'."""
  where = e.filename or ''
  if e.errno == errno.ENOSPC:
    return f'no space left on the device writing {where or "a file"}: free some space ' \
           '(the newest complete checkpoint is kept) and run again to resume'
  if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return f'cannot write {where}: {e.strerror}' if where else f'{e.strerror}'
  if e.errno == errno.EADDRINUSE:
    return f'{e.strerror}: the coordinator port is taken; pick another --coordinator_address'
  return f'{e.strerror or e}: {where}' if where else f'{e.strerror or e}'


def _cause_os_error(e: BaseException) -> OSError | None:
  """The OSError at the root of `e` (libraries such as Orbax and TensorStore wrap it)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError):
      return e
    e = e.__cause__ or e.__context__
  return None


def disk_full(e: BaseException) -> bool:
  os_error = _cause_os_error(e)
  return (os_error is not None and os_error.errno == errno.ENOSPC) or (
      'No space left on device' in str(e))


def fail(program: str, message: str) -> None:
  """One line on stderr (logging would repeat it there), exit status 1."""
  print(f'{program}: error: {message}', file=sys.stderr)
  sys.exit(1)


_BACKGROUND_NOISE = ('Event loop is closed', 'No space left on device',
                     'RESOURCE_EXHAUSTED: Error writing')


def _quiet_background_failures() -> None:
  """Library threads (Orbax's async save) that fail on a full disk, or after their event
  loop closed, print a traceback each; the main thread reports the failure in one line."""
  thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

  def on_thread(args):
    if not any(s in str(args.exc_value) for s in _BACKGROUND_NOISE):
      thread_hook(args)

  def on_unraisable(args):
    if not any(s in str(args.exc_value) for s in _BACKGROUND_NOISE):
      unraisable_hook(args)

  threading.excepthook, sys.unraisablehook = on_thread, on_unraisable


def run(program: str, fn, *args, workdir: str = '', **kwargs):
  """fn(*args, **kwargs); a user error ends the program with one line (exit 1). `workdir`:
  named by a disk-full error that names no file."""
  _quiet_background_failures()
  try:
    return fn(*args, **kwargs)
  except KeyboardInterrupt:
    fail(program, 'interrupted: stopped without saving; the newest complete checkpoint is '
                  'kept')
  except USER_ERRORS as e:
    fail(program, str(e))
  except OSError as e:
    if e.errno == errno.ENOSPC and not e.filename and workdir:
      e = OSError(errno.ENOSPC, e.strerror, f'{workdir}/...')
    fail(program, describe_os_error(e))
  except Exception as e:  # pylint: disable=broad-except
    if disk_full(e):
      fail(program, describe_os_error(OSError(errno.ENOSPC, 'No space left on device',
                                              f'{workdir}/...' if workdir else None)))
    if 'RESOURCE_EXHAUSTED' in str(e) and 'memory' in str(e).lower():
      fail(program, 'out of device memory: ' + str(e).strip().splitlines()[0][:300] +
           ' - lower batch_size or seq_len, use remat (model.remat), or shard over more '
           'devices (mesh.fsdp)')
    raise


def _last_line(text: str) -> str:
  """The message of a flag error: the exception line at the end of a quoted traceback."""
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  if not any(line.startswith('Traceback') for line in lines):
    return ' '.join(lines)
  last = re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', lines[-1])
  return f'{lines[0].removesuffix(":").removesuffix(": Error whilst parsing config file")}: ' \
         f'{last}'


def flags_parser(program: str):
  """For app.run(main, flags_parser=...): a bad flag, config file, config arg or override
  ends the program with one line (absl prints the config's traceback otherwise), and the
  config file is loaded here, before JAX starts."""
  def parse(argv):
    try:
      args = flags.FLAGS(argv)
      config = flags.FLAGS['config'].value if 'config' in flags.FLAGS else None
      if config is not None:
        config.get('trainer')  # a config that failed to load raises here
      return args
    except flags.Error as e:
      fail(program, _last_line(str(e)) + ' (--helpshort lists the flags)')
    except (AttributeError, KeyError) as e:  # an override of a key the config lacks
      name = str(e).strip('"\'')
      flag = next((a for a in argv[1:] if a.startswith('--config.') and name in a), name)
      fail(program, f'{flag.split("=")[0]}: the config has no key {name!r}')
    except Exception as e:  # pylint: disable=broad-except  # the config file failed to load
      arg = next((a for a in argv[1:] if a.startswith('--config=')), '--config')
      missing = re.search(r"No such file or directory: '([^']*)'", str(e))
      fail(program, f'{arg}: no such config file {missing.group(1)}' if missing else
           f'{arg}: {_last_line(str(e))}')
    return None
  return parse
