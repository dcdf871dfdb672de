"""Multi-process runs: `jax.distributed.initialize`, from flags or from a detected cluster.

  explicit   --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every
             process (all three or none); each process uses all of its local devices.
  automatic  none of the three flags, inside a cluster JAX knows how to bootstrap
             (`jax._src.clusters`: Cloud TPU pod slices on GCE or GKE, SLURM `srun` steps,
             Open MPI `mpirun`, indexed Kubernetes Jobs) that has more than one process:
             `jax.distributed.initialize()` with no arguments, as JAX documents.
  neither    one process, nothing initialized (a plain machine, a one-task SLURM step,
             a single-host TPU VM).

`initialize` must run after flag parsing and before anything touches a JAX backend
(`jax.devices()`, a computation). It also starts JAX's preemption sync manager, which the
training loop uses to agree on the step to checkpoint at after a SIGTERM.
"""

from __future__ import annotations

import socket
import time

from absl import flags, logging

FLAG_NAMES = ('coordinator_address', 'num_processes', 'process_id')


def define_flags() -> None:
  """--coordinator_address, --num_processes, --process_id (jax.distributed's names)."""
  flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0, the same on '
                      'every process (with --num_processes and --process_id). Unset: '
                      'auto-detected on TPU pods, SLURM, Open MPI, or a single process.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run.')
  flags.DEFINE_integer('process_id', None, 'This process\'s index in [0, num_processes).')
  flags.DEFINE_integer('distributed_timeout', 300, 'Seconds a process waits for all the '
                       'others to join before it gives up (multi-process runs).')


def check_args(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> bool:
  """-> True if the three are given (valid), False if none is; ValueError otherwise."""
  values = dict(zip(FLAG_NAMES, (coordinator_address, num_processes, process_id)))
  given = [k for k, v in values.items() if v is not None]
  if not given:
    return False
  if len(given) < len(values):
    missing = [f'--{k}' for k in FLAG_NAMES if k not in given]
    raise ValueError(f'--coordinator_address, --num_processes and --process_id go together: '
                     f'{", ".join(f"--{k}={values[k]}" for k in given)} given, '
                     f'{" and ".join(missing)} missing')
  host, _, port = coordinator_address.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(f'--coordinator_address={coordinator_address!r} must be HOST:PORT, '
                     'e.g. 10.0.0.1:1234 (process 0\'s host)')
  if num_processes < 1:
    raise ValueError(f'--num_processes={num_processes} must be >= 1')
  if not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id={process_id} must be in [0, {num_processes}) '
                     f'(--num_processes={num_processes})')
  return True


def detect_cluster():
  """-> the cluster environment `jax.distributed.initialize()` would bootstrap from, or
  None. Uses JAX's own (private) registry; an environment whose probe fails is skipped."""
  try:
    from jax._src import clusters
    candidates = list(clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return None
  for env in candidates:
    if getattr(env, 'opt_in_only_method', False):
      continue
    try:
      if env.is_env_present():
        return env
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('probing for a %s cluster failed (%s): ignored', env.__name__, e)
  return None


def _serve_rendezvous(coordinator_address: str, num_processes: int, timeout: int) -> None:
  """Process 0, before JAX: serve the coordinator's port until the other N - 1 processes
  have said they are there, then tell them to go on and free the port for JAX's service.
  One ValueError if the port is taken or someone is missing after `timeout` s (JAX's
  runtime would abort process 0 with a fatal-error dump instead)."""
  port = int(coordinator_address.rpartition(':')[2])
  server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    server.bind(('', port))
  except OSError as e:
    server.close()
    raise ValueError(f'--coordinator_address={coordinator_address}: port {port} cannot be '
                     f'served here ({e.strerror}): pick a free port') from None
  logging.warning('waiting for the other %d process(es) at %s (giving up after %d s: '
                  '--distributed_timeout)', num_processes - 1, coordinator_address, timeout)
  deadline = time.monotonic() + timeout
  peers: dict[int, socket.socket] = {}
  try:
    server.listen(num_processes)
    while len(peers) < num_processes - 1:
      server.settimeout(max(0.01, deadline - time.monotonic()))
      try:
        conn, _ = server.accept()
      except socket.timeout:
        missing = sorted(set(range(1, num_processes)) - set(peers))
        raise ValueError(f'process(es) {missing} did not join at --coordinator_address='
                         f'{coordinator_address} within {timeout} s: start every process '
                         '(same --coordinator_address and --num_processes), or raise '
                         '--distributed_timeout') from None
      conn.settimeout(5)
      try:
        words = conn.recv(64).decode(errors='replace').split()
      except OSError:
        words = []
      if len(words) == 2 and words[0] == 'join' and words[1].isdigit():
        peers.setdefault(int(words[1]), conn)
      else:
        conn.close()  # not one of ours (a port scanner, a stray client)
    for conn in peers.values():
      conn.sendall(b'go\n')
    for conn in peers.values():  # they close first: the port is left free for JAX
      conn.settimeout(5)
      try:
        conn.recv(1)
      except OSError:
        pass
  finally:
    for conn in peers.values():
      conn.close()
    server.close()


def _join_rendezvous(coordinator_address: str, process_id: int, timeout: int) -> None:
  """A process other than 0: say it is there to process 0 and wait for its go-ahead, or
  give up after `timeout` s with one ValueError (JAX's runtime would abort the process
  with a fatal-error dump instead)."""
  host, _, port = coordinator_address.rpartition(':')
  logging.warning('waiting for process 0 at %s (giving up after %d s: '
                  '--distributed_timeout)', coordinator_address, timeout)
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=1) as conn:
        conn.sendall(f'join {process_id}\n'.encode())
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        if conn.recv(3).startswith(b'go'):
          return
    except OSError:
      pass
    if time.monotonic() > deadline:
      raise ValueError(f'process 0 did not start the run at --coordinator_address='
                       f'{coordinator_address} within {timeout} s: start it there (or check '
                       'the address and --num_processes), or raise --distributed_timeout')
    time.sleep(0.2)


def _join(timeout: int, where: str, **kwargs) -> None:
  """jax.distributed.initialize, saying what it waits for; one ValueError if it fails."""
  import jax
  logging.warning('waiting for the other processes at %s (giving up after %d s: '
                  '--distributed_timeout)', where, timeout)
  try:
    jax.distributed.initialize(initialization_timeout=timeout, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  # JAX's runtime errors
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'could not join the multi-process run at {where} within {timeout} s '
                     f'({first[:200]}): start every process, check --coordinator_address '
                     'and --num_processes, or raise --distributed_timeout') from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout: int = 300) -> str | None:
  """Initialize jax.distributed explicitly (all three arguments) or automatically (none),
  waiting up to `timeout` seconds for every process.

  Returns how: 'flags', the detected cluster's class name, or None (one process).
  """
  if timeout <= 0:
    raise ValueError(f'--distributed_timeout={timeout} must be > 0 seconds')
  if check_args(coordinator_address, num_processes, process_id):
    logging.info('jax.distributed.initialize: process %d of %d, coordinator %s',
                 process_id, num_processes, coordinator_address)
    # A rendezvous of our own first: JAX's runtime aborts a process whose peers are missing.
    if num_processes > 1 and process_id == 0:
      _serve_rendezvous(coordinator_address, num_processes, timeout)
    elif num_processes > 1:
      _join_rendezvous(coordinator_address, process_id, timeout)
    # 'deactivate': flags are the whole truth; no cluster may restrict the visible devices.
    _join(timeout, coordinator_address, coordinator_address=coordinator_address,
          num_processes=num_processes, process_id=process_id,
          cluster_detection_method='deactivate')
    return 'flags'
  env = detect_cluster()
  if env is None:
    return None
  try:
    count = env.get_process_count()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('%s detected, but its process count is unknown (%s): running as one '
                    'process. Pass --coordinator_address, --num_processes and --process_id '
                    'for a multi-process run.', env.__name__, e)
    return None
  if count is None or int(count) <= 1:
    logging.info('%s detected with one process: jax.distributed not initialized',
                 env.__name__)
    return None
  logging.info('%s detected with %d processes: jax.distributed.initialize()', env.__name__,
               int(count))
  _join(timeout, f'the {env.__name__} coordinator')
  return env.__name__


def initialize_from_flags() -> str | None:
  """`initialize` with the values of the flags from `define_flags`."""
  return initialize(*(flags.FLAGS[name].value for name in FLAG_NAMES),
                    timeout=flags.FLAGS.distributed_timeout)
