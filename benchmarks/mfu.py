"""MFU and per-device memory of the 1B-class (and base) configs of dense, MoE, MoMa 4t4i and
MoT on the devices at hand; with --dry_run, the plan and each compiled program's per-device
memory on fake CPU devices, so a user knows before renting what fits where.

  python benchmarks/mfu.py --dry_run --fake_devices=8 --sizes=1b --meshes=1x8x1x1 \\
      --batch_size=8                     # 2 CPU cores: 0.5-6 min per 1b config (MoT slowest)
  XLA_PYTHON_CLIENT_MEM_FRACTION=.95 python benchmarks/mfu.py --sizes=1b \\
      --families=dense,moe,mot --compute_dtype=bfloat16 --remat=block --batch_size=4 \\
      --json=mfu.json                    # one H200 (docs/performance.md has the GPU list)
  python benchmarks/mfu.py --sizes=tiny --batch_size=8 --seq_len=64 --repeats=1  # CPU check

Configs: dense configs/dense.py:SIZE, moe configs/moe.py:SIZE, moma
configs/moma.py:SIZE,groups=4t4i, mot configs/mot.py:SIZE,untie=all, mamba configs/mamba.py:SIZE
(optional), each built as training builds it: the state layout of training/state.py and the
jit with shardings and donation of training/loop.py, through benchmarks/timing.py as
benchmarks/train_step.py does. A run measures each config in turn (one state on the devices at
a time; a config that fails, e.g. out of memory, is reported and skipped). Per config:

  params          total and active per token (models/transformer.param_count)
  compile s       jit(...).lower(...).compile() (dry run: the abstract state's)
  step ms         median over --repeats of the mean step time of a repeat (chained steps, as
                  many as last about --repeat_seconds; compile and --warmup steps not timed)
  tokens/s        B T / step time (every position counts, padding included)
  model TFLOP/s   F / step time, F = training/flops.train_flops_per_step: 6 x active matmul
                  parameters (LM head included) + PaLM's 12 L H K T attention term, per token,
                  x B T. Rematerialisation is not counted: model FLOPs, not hardware FLOPs
  MFU datasheet   F / step time / (devices x P), P the dense bf16 peak of the device kind
                  (PEAK_FLOPS; n/a for a kind not in it, e.g. CPU). Against bf16 peak whatever
                  --compute_dtype is (float32 dots run as TF32 on NVIDIA GPUs)
  MFU matmul      median over repeats of (F / step time) / (devices x 2 N^3 / matmul time):
                  an N x N @ N x N matmul at the compute dtype on one device, timed in repeats
                  that alternate with the step's (benchmarks/train_step.py's ratio)
  memory/device   compiled.memory_analysis() of the step's program for one device: arguments
                  (the state shard + the batch shard), outputs, aliased (outputs written into
                  donated arguments: the new state), temps (XLA's temp allocation: activations,
                  gathered FSDP weights, gradients, ...). Peak estimate = arguments + outputs -
                  aliased + temps: what the program allocates while it runs (XLA packs the
                  temporaries into one buffer by their live ranges), short of the runtime's
                  own overhead (CUDA context, cuBLAS/cuDNN workspaces). Arguments, outputs
                  and aliased are the shapes' bytes on any backend; temps are the compiling
                  backend's: fake CPU devices give XLA:CPU's schedule and fusions, not a GPU's.
                  `fits G GiB`: peak estimate <= G GiB (--device_memory_gib). JAX on a GPU
                  takes 75% of its memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says more.

With dense in --families, `X/dense step time ratio` = (median step/matmul time of X) / (that
of dense), same size and mesh: the step-time ratio with machine-load drift divided out.

Results and how to read them: docs/performance.md.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time

from absl import app, flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import dense, mamba, moe, moma, mot  # noqa: E402
from core import partitioning  # noqa: E402
from models import transformer  # noqa: E402
from training import flops, metrics  # noqa: E402
from training import state as state_lib  # noqa: E402
from training.validate import validate  # noqa: E402
from benchmarks import timing  # noqa: E402

_SIZES = flags.DEFINE_list('sizes', ['1b'], 'Sizes of configs/common.py SIZES.')
_FAMILIES = flags.DEFINE_list('families', ['dense', 'moe', 'moma', 'mot'],
                              'Families (CONFIGS): dense, moe, moma, mot, mamba.')
_DTYPE = flags.DEFINE_enum('compute_dtype', '', ['', 'float32', 'bfloat16'],
                           'config.compute_dtype ("": the config\'s; base/1b: bfloat16).')
_REMAT = flags.DEFINE_enum('remat', '', ['', 'block', 'none'],
                           'config.model.remat: block = every block rematerialised in the '
                           'backward pass (nnx.remat, saving only its inputs), none = off, '
                           '"": the config\'s (on for base/1b). The model has no finer policy.')
_ATTN = flags.DEFINE_enum('attention_impl', '', ['', 'xla', 'cudnn'],
                          'config.model.attention_impl ("": the config\'s, JAX picks: XLA).')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Global batch in sequences (0: the config\'s).')
_SEQ = flags.DEFINE_integer('seq_len', 0, 'Sequence length (0: the config\'s).')
_LAYERS = flags.DEFINE_integer('num_layers', 0, 'config.model.num_layers (0: the config\'s); '
                               'fewer layers fit a ratio to dense onto fewer devices.')
_MESHES = flags.DEFINE_list('meshes', [],
                            'Meshes DATAxFSDPxEXPERTxTENSOR (one size may be -1: the devices '
                            'left), each config on each; empty: the config\'s mesh. A mesh '
                            'of fewer devices takes the first ones.')
_DRY = flags.DEFINE_bool('dry_run', False, 'Compile only (abstract state): plan and memory.')
_FAKE = flags.DEFINE_integer('fake_devices', 0, 'N fake CPU devices (XLA_FLAGS '
                             '--xla_force_host_platform_device_count=N, platform cpu).')
_GIB = flags.DEFINE_list('device_memory_gib', ['80', '141'],
                         'Device memories (GiB) to check the peak estimate against '
                         '(H100 80 GB, H200 141 GB).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats; the median is reported.')
_REPEAT_S = flags.DEFINE_float('repeat_seconds', 1.0, 'Target length of one repeat.')
_MATMUL_N = flags.DEFINE_integer('matmul_size', 0, 'N of the reference matmul (0: 8192 on '
                                 'GPU/TPU, 2048 on CPU).')
_JSON = flags.DEFINE_string('json', '', 'Also write the rows to this JSON file.')

# family -> (config module, config arg with {} for the size)
CONFIGS = {'dense': (dense, '{}'), 'moe': (moe, '{}'), 'moma': (moma, '{},groups=4t4i'),
           'mot': (mot, '{},untie=all'), 'mamba': (mamba, '{}')}
# Dense bf16 peak FLOP/s per device from the datasheets (docs/performance.md cites them), by
# substring of jax's device_kind, first match wins; None: a variant of another peak, n/a.
PEAK_FLOPS = (
    ('H100 PCIe', 756e12), ('H100 NVL', None), ('H100', 989e12),
    ('H200 NVL', None), ('H200', 989e12),
    ('A100', 312e12),
    ('TPU v4 lite', None), ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12), ('TPU v5e', 197e12), ('TPU v5p', 459e12), ('TPU v5', 459e12),
    ('TPU v6 lite', 918e12), ('TPU v6e', 918e12),
)
# XLA:CPU's all-reduce-promotion pass aborts the process (CHECK failure in CloneAllReduce:
# "Invalid binary instruction opcode copy") compiling MoT's step with bf16 compute on more
# than one device (jax 0.11.2). A dry run on fake CPU devices compiles these families
# without that pass; it changes the CPU temps (docs/performance.md).
CPU_COMPILE_OPTIONS = {'mot': {'xla_disable_hlo_passes': 'all-reduce-promotion'}}
GIB = 2.0 ** 30
MEMORY_FIELDS = ('argument', 'output', 'alias', 'temp')


def datasheet_peak(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of `device_kind`, or None if not known."""
  for pattern, peak in PEAK_FLOPS:
    if pattern.lower() in device_kind.lower():
      return peak
  return None


def utilisation(flops_per_step: float, step_s: float, devices: int,
                peak: float | None) -> tuple[float, float | None]:
  """-> (model FLOP/s, MFU = FLOP/s / (devices x peak), None without a peak)."""
  rate = flops_per_step / step_s
  return rate, (rate / (devices * peak) if peak else None)


def make_config(family: str, size: str, *, compute_dtype: str = '', remat: str = '',
                attention_impl: str = '', batch_size: int = 0, seq_len: int = 0,
                num_layers: int = 0):
  """The family's config at `size` (CONFIGS) with the overrides that are set."""
  if family not in CONFIGS:
    raise ValueError(f'unknown family {family!r}; known: {sorted(CONFIGS)}')
  module, arg = CONFIGS[family]
  config = module.get_config(arg.format(size))
  config.compute_dtype = compute_dtype or config.compute_dtype
  if remat:
    config.model.remat = remat == 'block'
  config.model.attention_impl = attention_impl or config.model.attention_impl
  config.batch_size = batch_size or config.batch_size
  config.seq_len = seq_len or config.seq_len
  config.model.num_layers = num_layers or config.model.num_layers
  return config


def config_name(family: str, size: str) -> str:
  module, arg = CONFIGS[family]
  return f'configs/{module.__name__.rpartition(".")[2]}.py:{arg.format(size)}'


def parse_mesh(text: str) -> tuple[int, ...]:
  """'1x8x1x1' -> (1, 8, 1, 1): data x fsdp x expert x tensor."""
  parts = text.strip().split('x')
  try:
    sizes = tuple(int(p) for p in parts)
  except ValueError:
    sizes = ()
  if len(sizes) != len(partitioning.MESH_AXES):
    raise ValueError(f'mesh {text!r} is not DATAxFSDPxEXPERTxTENSOR, e.g. 1x8x1x1')
  return sizes


def mesh_for(config, sizes: tuple[int, ...] | None = None) -> jax.sharding.Mesh:
  """The mesh of `config` (sizes, if given, set into config.mesh first) over the first
  devices it needs (all of them with a -1), after the trainer's checks (validate)."""
  if sizes:
    for axis, n in zip(partitioning.MESH_AXES, sizes):
      config.mesh[axis] = n
  wanted = [int(config.mesh[a]) for a in partitioning.MESH_AXES]
  n = jax.device_count() if -1 in wanted else math.prod(wanted)
  if n > jax.device_count():
    raise ValueError(f'mesh {dict(zip(partitioning.MESH_AXES, wanted))} needs {n} devices,'
                     f' {jax.device_count()} are here (--fake_devices=N for a dry run)')
  validate(config, n)
  return partitioning.make_mesh(config.mesh, jax.devices()[:n])


def mesh_label(mesh) -> str:
  return 'x'.join(str(mesh.shape[a]) for a in partitioning.MESH_AXES)


def plan(config, mesh) -> dict:
  """What one config runs: counts and shapes, nothing compiled."""
  spec = state_lib.model_spec(config)
  shards = partitioning.batch_shards(mesh)
  return {'mesh': mesh_label(mesh), 'devices': mesh.devices.size,
          'num_layers': config.model.num_layers,
          'compute_dtype': config.compute_dtype, 'remat': bool(config.model.remat),
          'attention_impl': config.model.attention_impl or 'default',
          'params': transformer.param_count(spec),
          'active_params': transformer.param_count(spec, active=True),
          'batch_size': config.batch_size, 'seq_len': config.seq_len,
          'batch_per_device': config.batch_size // shards,
          'tokens_per_step': config.batch_size * config.seq_len,
          'model_flops_per_step': flops.train_flops_per_step(spec, config.seq_len,
                                                             config.batch_size)}


def memory_row(stats, device_memory_gib=()) -> dict:
  """compiled.memory_analysis() -> bytes per device: argument, output, alias, temp, peak
  (= argument + output - alias + temp), and `fits G GiB` for each G."""
  row = {f: int(getattr(stats, f'{f}_size_in_bytes')) for f in MEMORY_FIELDS}
  return with_peak(row, device_memory_gib)


def with_peak(row: dict, device_memory_gib=()) -> dict:
  row['peak'] = row['argument'] + row['output'] - row['alias'] + row['temp']
  row['fits'] = {f'{g:g} GiB': row['peak'] <= g * GIB for g in device_memory_gib}
  return row


def state_bytes_per_device(abstract) -> int:
  """Bytes of one device's shard of an abstract pytree whose leaves carry shardings."""
  return sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(abstract))


def abstract_batch(config, batch_sh) -> dict:
  """The host batch of tests.helpers.random_batch as ShapeDtypeStructs of the global batch
  on `batch_sh` (what timing.compile_step feeds the step)."""
  from tests.helpers import random_batch  # pylint: disable=import-outside-toplevel
  example = random_batch(2, config.seq_len, seed=0)
  return {k: jax.ShapeDtypeStruct((config.batch_size,) + v.shape[1:], v.dtype,
                                  sharding=batch_sh) for k, v in example.items()}


def cpu_workaround(config, mesh) -> dict | None:
  """CPU_COMPILE_OPTIONS of the config's family where XLA:CPU needs them (several devices)."""
  if jax.default_backend() != 'cpu' or mesh.devices.size == 1:
    return None
  return CPU_COMPILE_OPTIONS.get(config.model.family)


def compile_abstract(config, mesh):
  """The train step of `config` lowered on its abstract state (nothing allocated) and
  compiled, as timing.compile_step jits it (`cpu_workaround` options where needed).
  -> (compiled, layout, seconds)."""
  layout = state_lib.state_layout(config, mesh)
  jitted, batch_sh = timing.jit_step(layout, mesh)
  batch = abstract_batch(config, batch_sh)
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = jitted.lower(layout.abstract, batch).compile(cpu_workaround(config, mesh))
  return compiled, layout, time.perf_counter() - t0


def dry_run(config, mesh, *, device_memory_gib=()) -> dict:
  """Compile (never run) the step of `config` on `mesh`, every layer of it: its memory per
  device, the state's bytes per device (`state_bytes`), compile seconds."""
  compiled, layout, seconds = compile_abstract(config, mesh)
  row = memory_row(compiled.memory_analysis(), device_memory_gib)
  row.update(state_bytes=state_bytes_per_device(layout.abstract), compile_s=seconds,
             compiler_options=cpu_workaround(config, mesh))
  return row


def device_peak_bytes(mesh) -> int | None:
  """The largest `peak_bytes_in_use` of the mesh's devices since the process started
  (GPU/TPU); None where the runtime has no memory stats (CPU)."""
  peaks = []
  for d in mesh.devices.flat:
    stats = d.memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def measure(config, mesh, matmul: dict, *, warmup: int, repeats: int, repeat_seconds: float,
            device_memory_gib=(), peak: float | None = None) -> dict:
  """Compile and time the train step of `config` (sharded init, timing.compile_step) in
  repeats alternating with `matmul` ({'timer', 'n'}, at the compute dtype)."""
  if cpu_workaround(config, mesh) and config.compute_dtype == 'bfloat16':
    raise ValueError('XLA:CPU aborts compiling this step on several devices in bfloat16 '
                     '(CPU_COMPILE_OPTIONS): time it on one device, in float32, or on a GPU')
  timer, compiled, _, info = timing.compile_step(config, mesh)
  row = memory_row(compiled.memory_analysis(), device_memory_gib)
  with jax.set_mesh(mesh):
    timer.warm_up(warmup, repeat_seconds)
    if not matmul.get('warm'):
      matmul['timer'].warm_up(warmup, repeat_seconds)
      matmul['warm'] = True
    pairs = [(timer.repeat(), matmul['timer'].repeat()) for _ in range(repeats)]
  n_dev = mesh.devices.size
  model_flops = flops.train_flops_per_step(state_lib.model_spec(config), config.seq_len,
                                           config.batch_size)
  step_s = statistics.median(t for t, _ in pairs)
  rate, mfu = utilisation(model_flops, step_s, n_dev, peak)
  mm_flops = 2.0 * matmul['n'] ** 3 * n_dev  # every device of the mesh runs the step
  row.update(compile_s=info['compile_s'], step_ms=step_s * 1e3, steps_per_repeat=timer.calls,
             tokens_per_s=config.batch_size * config.seq_len / step_s,
             model_flops_per_s=rate, mfu_datasheet=mfu,
             mfu_matmul=timing.matmul_ratio(pairs, model_flops, mm_flops),
             matmul_ms=statistics.median(m for _, m in pairs) * 1e3,
             step_per_matmul=statistics.median(t / m for t, m in pairs),
             device_peak_bytes=device_peak_bytes(mesh), repeats=len(pairs))
  return row


def _count(n: int) -> str:
  return f'{n / 1e9:.3f}B' if n >= 1e9 else f'{n / 1e6:.1f}M'


def _gib(x) -> str:
  return '-' if x is None else f'{x / GIB:.2f}'


def _pct(x) -> str:
  return 'n/a' if x is None else f'{100 * x:.1f}%'


def _print_table(head, lines) -> None:
  table = [tuple(head)] + [tuple(map(str, line)) for line in lines]
  widths = [max(len(line[i]) for line in table) for i in range(len(head))]
  for line in table:
    print('  '.join(c.rjust(w) for c, w in zip(line, widths)))


def print_rows(rows: list[dict], dry: bool) -> None:
  ok = [r for r in rows if 'error' not in r]
  fits = list(ok[0]['fits']) if ok else []
  head = ['config', 'L', 'mesh', 'B x T', 'B/dev', 'dtype', 'remat', 'params', 'active']
  if dry:
    head += ['compile s', 'args GiB', 'out GiB', 'alias GiB', 'temp GiB', 'peak GiB']
  else:
    head += ['compile s', 'step ms', 'tokens/s', 'model TFLOP/s', 'MFU sheet',
             'MFU matmul', 'peak GiB']
  head += [f'fits {g}' for g in fits]
  lines = []
  for r in ok:
    line = [r['config'], r['num_layers'], r['mesh'], f'{r["batch_size"]} x {r["seq_len"]}',
            r['batch_per_device'], r['compute_dtype'], 'block' if r['remat'] else 'none',
            _count(r['params']), _count(r['active_params']),
            f'{r["compile_s"]:.1f}']
    if dry:
      line += [_gib(r[f]) for f in MEMORY_FIELDS]
    else:
      line += [f'{r["step_ms"]:.1f}', f'{r["tokens_per_s"]:,.0f}',
               f'{r["model_flops_per_s"] / 1e12:.3f}', _pct(r['mfu_datasheet']),
               _pct(r['mfu_matmul'])]
    line += [_gib(r['peak'])] + ['yes' if r['fits'][g] else 'no' for g in fits]
    lines.append(line)
  _print_table(head, lines)
  for r in rows:
    if 'error' in r:
      print(f'{r["config"]} on {r["mesh"]}: not run: {r["error"]}')
      continue
    if r.get('compiler_options'):
      print(f'{r["config"]} on {r["mesh"]}: compiled with {r["compiler_options"]} '
            '(CPU_COMPILE_OPTIONS: an XLA:CPU crash otherwise)')


def step_ratios(rows: list[dict]) -> dict[str, float]:
  """'moe 1b 1x1x1x1' -> its step_per_matmul / dense's of the same size and mesh."""
  dense_at = {(r['size'], r['mesh']): r['step_per_matmul'] for r in rows
              if r['family'] == 'dense' and 'step_per_matmul' in r}
  return {f'{r["family"]} {r["size"]} {r["mesh"]}':
          r['step_per_matmul'] / dense_at[(r['size'], r['mesh'])]
          for r in rows if r['family'] != 'dense' and 'step_per_matmul' in r
          and (r['size'], r['mesh']) in dense_at}


def use_fake_devices(n: int) -> None:
  """n CPU devices for this process; jax must not have started its backends yet."""
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={n}').strip()
  jax.config.update('jax_platforms', 'cpu')
  if jax.device_count() != n:
    raise app.UsageError(f'--fake_devices={n}: jax already has {jax.device_count()} '
                         'devices (its backend started before the flag was read)')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _FAKE.value:
    use_fake_devices(_FAKE.value)
  unknown = [f for f in _FAMILIES.value if f not in CONFIGS]
  if unknown:
    raise app.UsageError(f'--families: unknown {unknown}; known: {sorted(CONFIGS)}')
  try:
    meshes = [parse_mesh(m) for m in _MESHES.value] or [None]
    gib = [float(g) for g in _GIB.value]
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  metrics.quiet_library_logs()
  dev = jax.devices()
  kind, peak = dev[0].device_kind, datasheet_peak(dev[0].device_kind)
  print(f'jax {jax.__version__}, {len(dev)} x {kind} ({jax.default_backend()}), '
        f'{os.cpu_count()} host cores; datasheet bf16 peak per device: '
        f'{"n/a" if peak is None else f"{peak / 1e12:.0f} TFLOP/s"}'
        f'{"; DRY RUN: compile only" if _DRY.value else ""}')
  overrides = dict(compute_dtype=_DTYPE.value, remat=_REMAT.value,
                   attention_impl=_ATTN.value, batch_size=_BATCH.value, seq_len=_SEQ.value,
                   num_layers=_LAYERS.value)
  jobs = []  # (family, size, config, mesh), all planned before anything compiles
  for size in _SIZES.value:
    for family in _FAMILIES.value:
      for sizes in meshes:
        config = make_config(family, size, **overrides)
        try:
          mesh = mesh_for(config, sizes)
        except ValueError as e:
          raise app.UsageError(f'{config_name(family, size)}: {e}') from None
        jobs.append((family, size, config, mesh))
  print('plan:')
  for family, size, config, mesh in jobs:
    p = plan(config, mesh)
    print(f'  {config_name(family, size)}  {p["num_layers"]} layers  mesh '
          f'{mesh_label(mesh)} ({p["devices"]} device{"s" * (p["devices"] > 1)})  batch '
          f'{p["batch_size"]} x {p["seq_len"]} ({p["batch_per_device"]} per device)  '
          f'{p["compute_dtype"]}  remat {p["remat"]}  attention {p["attention_impl"]}  '
          f'params {_count(p["params"])} (active {_count(p["active_params"])})  '
          f'{p["model_flops_per_step"] / 1e12:.4g} TFLOP/step', flush=True)
  n_mm = _MATMUL_N.value or (2048 if jax.default_backend() == 'cpu' else 8192)
  matmuls, rows = {}, []
  for family, size, config, mesh in jobs:
    row = {'config': config_name(family, size), 'family': family, 'size': size,
           **plan(config, mesh)}
    try:
      if _DRY.value:
        row.update(dry_run(config, mesh, device_memory_gib=gib))
      else:
        if config.compute_dtype not in matmuls:
          matmuls[config.compute_dtype] = {
              'timer': timing.matmul_timer(n_mm, config.compute_dtype), 'n': n_mm}
        row.update(measure(config, mesh, matmuls[config.compute_dtype],
                           warmup=_WARMUP.value, repeats=_REPEATS.value,
                           repeat_seconds=_REPEAT_S.value, device_memory_gib=gib,
                           peak=peak))
    except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory: go on
      row['error'] = f'{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}'
    gc.collect()
    rows.append(row)
    done = ('error: ' + row['error'] if 'error' in row else
            f'peak {_gib(row["peak"])} GiB/device' if _DRY.value else
            f'{row["step_ms"]:.1f} ms/step, MFU matmul {_pct(row["mfu_matmul"])}')
    print(f'  done {row["config"]} on {row["mesh"]}: {done}', flush=True)
  print()
  print_rows(rows, _DRY.value)
  ratios = {} if _DRY.value else step_ratios(rows)
  for name, ratio in ratios.items():
    family, _, where = name.partition(' ')
    print(f'{family}/dense step time ratio ({where}, matmul-normalised): {ratio:.3f}')
  for dtype, m in matmuls.items():
    ms = [r['matmul_ms'] for r in rows if r.get('matmul_ms') and r['compute_dtype'] == dtype]
    if ms:
      sec = statistics.median(ms) / 1e3
      print(f'matmul {m["n"]}x{m["n"]} {dtype} inputs, float32 accumulation: {sec * 1e3:.2f} '
            f'ms, {2.0 * m["n"] ** 3 / sec / 1e12:.3f} TFLOP/s on one device')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'jax': jax.__version__, 'device_kind': kind, 'devices': len(dev),
                 'backend': jax.default_backend(), 'datasheet_peak_flops': peak,
                 'dry_run': _DRY.value, 'matmul_size': n_mm, 'rows': rows,
                 'step_time_ratios': ratios}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
