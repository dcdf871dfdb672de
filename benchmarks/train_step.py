"""Steady-state train-step time and model FLOP/s of the dense configs, set against a plain
matmul measured on the same device in the same run (a "fraction of matmul peak" MFU), and
the MoE tiny step against the dense tiny step.

  python benchmarks/train_step.py                      # 2-core CPU defaults: minutes
  python benchmarks/train_step.py --sizes=tiny --families=mamba,mom   # the Mamba ratios
  python benchmarks/train_step.py --batch_sizes= --json=bench.json   # config batch sizes

Per size in --sizes: build the train state exactly as training/loop.py does (sharded init on
the default mesh, the same jit with shardings and donation), AOT-compile the step, warm up,
then time --repeats repeats of n chained steps (n chosen so a repeat lasts about
--repeat_seconds) and report the median seconds per step. Model FLOPs per step come from
training/flops.py (6 x matmul params + attention; remat not counted). The reference is a
chain `x <- x @ w` of N x N matrices (w orthogonal, so values stay finite) with float32 or
bf16 inputs and float32 accumulation. The matmul at the config's compute dtype is timed in
repeats alternating with the train step's, and the ratio is the median of the per-pair
ratios, so a change in machine load hits both sides alike. Absolute times vary between
machines and runs: compare the ratios. Results and their reading: docs/benchmarks.md.

With tiny in --sizes, the train steps of the --families (default moe, moma, mot) at tiny
size and equal active FLOPs per token are timed in the same repeats as dense tiny and its
matmul: configs/moe.py:tiny with each expert's mlp_dim = dense mlp_dim / k,
configs/moma.py:tiny (4t4i, expert choice with c = 1/4: one expert of width F per token on
average) and configs/mot.py:tiny (all untied). The last lines are `moe/dense step time
ratio: X`, `moma/dense step time ratio: X` and `mot/dense step time ratio: X`, medians of
the per-repeat ratios (docs/moe.md, docs/moma.md, docs/mot.md).

The Mamba families (docs/mamba.md) join the same repeats: `mamba` is configs/mamba.py:tiny
(a pure Mamba stack, not FLOPs-matched to dense: `mamba/dense step time ratio` compares the
two tiny configs as they train), and `mom` is its Mixture-of-Mamba (`untie=all`), which has
the dense Mamba's FLOPs per token (untying adds parameters, not FLOPs), so its ratio is
against the Mamba step: `mom/mamba step time ratio: X` (`mom` brings `mamba` along). With
`mamba` timed, so is the selective scan alone: one jitted forward + backward of
models/ssm.selective_scan (gradients of every input, its rematerialisation
included) on one Mamba layer's shapes (batch x length x inner width x state, the config's
chunk), in the same repeats; `mamba scan share of the step: X` is the median over repeats of
(Mamba layers x that time) / the Mamba train step's time.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from absl import app, flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import dense, mamba, moe, moma, mot  # noqa: E402
from core import partitioning  # noqa: E402
from models import mamba as mamba_lib, ssm  # noqa: E402
from training import flops, metrics  # noqa: E402
from training import state as state_lib  # noqa: E402
from training.validate import validate  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks.timing import Timer, matmul_timer  # noqa: E402

_SIZES = flags.DEFINE_list('sizes', ['tiny', 'small'], 'Sizes of configs/dense.py to time.')
_BATCH = flags.DEFINE_list('batch_sizes', ['small=8'],
                           'size=B overrides of the global batch; unnamed sizes keep the '
                           'config value (empty: all config values).')
_SEQ = flags.DEFINE_list('seq_lens', [], 'size=T overrides of the sequence length.')
_DTYPE = flags.DEFINE_enum('compute_dtype', '', ['', 'float32', 'bfloat16'],
                           'Override every config\'s compute dtype ("": keep the config\'s).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed calls after compilation.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats; the median is reported.')
_REPEAT_S = flags.DEFINE_float('repeat_seconds', 1.0,
                               'Target length of one repeat (at least one call).')
_MATMUL_N = flags.DEFINE_integer('matmul_size', 2048, 'N of the N x N @ N x N matmul.')
_MATMUL_DTYPES = flags.DEFINE_list('matmul_dtypes', ['float32', 'bfloat16'],
                                   'Input dtypes of the matmul (accumulation is float32); '
                                   'each config\'s compute dtype is added if missing.')
_JSON = flags.DEFINE_string('json', '', 'Also write the results to this JSON file.')
_FAMILIES = flags.DEFINE_list('families', ['moe', 'moma', 'mot', 'mamba', 'mom'],
                              'Families timed with dense tiny in the same repeats (moe, '
                              'moma, mot at equal active FLOPs; mamba; mom against mamba; '
                              'empty: none).')


def _overrides(pairs: list[str], flag: str) -> dict[str, int]:
  out = {}
  for pair in pairs:
    size, eq, value = pair.partition('=')
    if not eq or not value.isdigit():
      raise app.UsageError(f'--{flag} entries are size=int, got {pair!r}')
    out[size] = int(value)
  return out


def moe_config_like(dense_config):
  """configs/moe.py at the dense config's size, batch, length and dtype, with each expert's
  mlp_dim = dense mlp_dim / k: a token's active FFN FLOPs equal the dense FFN's."""
  config = moe.get_config(dense_config.size)
  for key in ('batch_size', 'seq_len', 'compute_dtype'):
    config[key] = dense_config[key]
  config.model.moe.mlp_dim = config.model.mlp_dim // config.model.moe.k
  return config


def moma_config_like(dense_config):
  """configs/moma.py (4t4i, c = 1/4 per group) at the dense config's size, batch, length and
  dtype: each token goes through one expert of the dense FFN's width on average."""
  config = moma.get_config(dense_config.size)
  for key in ('batch_size', 'seq_len', 'compute_dtype'):
    config[key] = dense_config[key]
  config.model.moma.mlp_dim = config.model.mlp_dim
  return config


def mot_config_like(dense_config):
  """configs/mot.py (everything untied) at the dense config's size, batch, length and dtype:
  the same FLOPs per token as the dense model."""
  config = mot.get_config(dense_config.size)
  for key in ('batch_size', 'seq_len', 'compute_dtype'):
    config[key] = dense_config[key]
  return config


def mamba_config_like(dense_config, untie: str = 'none'):
  """configs/mamba.py (`untie`) at the dense config's size, batch, length and dtype."""
  config = mamba.get_config(f'{dense_config.size},untie={untie}')
  for key in ('batch_size', 'seq_len', 'compute_dtype'):
    config[key] = dense_config[key]
  return config


LIKE = {'moe': moe_config_like, 'moma': moma_config_like, 'mot': mot_config_like,
        'mamba': mamba_config_like, 'mom': lambda c: mamba_config_like(c, untie='all')}
REFERENCE = {'mom': 'mamba'}  # the family a ratio divides by (default: dense)


def scan_timer(config) -> Timer:
  """Forward + backward of models/ssm.selective_scan alone on one Mamba layer's shapes
  of `config` (B, T, E, N, its chunk), float32 as in the block: every input's gradient,
  each call's inputs nudged by its gradients (1e-9) so calls chain."""
  spec = mamba_lib.mamba_spec_from_config(config.model.mamba)
  B, L = config.batch_size, config.seq_len
  E, N = spec.inner(config.model.embed_dim), spec.state
  k = jax.random.split(jax.random.key(0), 5)
  args = (jax.nn.softplus(jax.random.normal(k[0], (B, L, E)) - 3.0),  # Δ around 0.05
          -jnp.broadcast_to(jnp.arange(1, N + 1, dtype=jnp.float32), (E, N)),
          jax.random.normal(k[1], (B, L, N)), jax.random.normal(k[2], (B, L, N)),
          jax.random.normal(k[3], (B, L, E)))
  cot = jax.random.normal(k[4], (B, L, E))

  def loss(a):
    return jnp.sum(ssm.selective_scan(*a, chunk=spec.chunk, scan=spec.scan)[0] * cot)

  step = jax.jit(lambda a: tuple(t + 1e-9 * g for t, g in zip(a, jax.grad(loss)(a))))
  return Timer(step.lower(args).compile(), args)


def compile_step(config, mesh) -> tuple[Timer, dict]:
  """The train step of `config` (validated) built and AOT-compiled as training/loop.py does."""
  timer, _, _, info = timing.compile_step(config, mesh)
  return timer, info


def _row(name: str, config, info: dict, timer: Timer, pairs, mm_flops: float) -> dict:
  """Table row of a step timed in `pairs` (step seconds, matmul seconds) per repeat."""
  tokens = config.batch_size * config.seq_len
  model_flops = flops.train_flops_per_step(state_lib.model_spec(config), config.seq_len,
                                           config.batch_size)
  sec = statistics.median(t for t, _ in pairs)
  return {'config': name, 'compute_dtype': config.compute_dtype,
          'params': info['params'], 'batch_size': config.batch_size, 'seq_len': config.seq_len,
          'tokens_per_step': tokens, 'compile_s': info['compile_s'], 'step_ms': sec * 1e3,
          'steps_per_repeat': timer.calls, 'tokens_per_s': tokens / sec,
          'model_flops_per_step': model_flops, 'model_flops_per_s': model_flops / sec,
          'matmul_flop_ratio': timing.matmul_ratio(pairs, model_flops, mm_flops)}


def bench_size(size: str, batch_size: int | None, seq_len: int | None, matmuls: dict,
               families: tuple[str, ...] = ()) -> tuple[list[dict], dict[str, float]]:
  """Compile and time the dense train step of `size` as training/loop.py runs it, with the
  matmul at its compute dtype timed in alternate repeats (load changes hit both alike).
  `families`: their steps (`LIKE[family]`) join every repeat (and the scan alone with
  'mamba'). Returns the rows and the median per-repeat ratios: family / reference step
  time of each family (REFERENCE, default dense) and 'scan_share' with 'mamba'."""
  config = dense.get_config(size)
  config.batch_size = batch_size or config.batch_size
  config.seq_len = seq_len or config.seq_len
  config.compute_dtype = _DTYPE.value or config.compute_dtype
  validate(config, jax.device_count())
  mesh = partitioning.make_mesh(config.mesh)
  train, info = compile_step(config, mesh)
  steps = [(f'dense {size}', config, info, train)]
  if 'mom' in families and 'mamba' not in families:
    families = tuple(families) + ('mamba',)
  for family in families:
    other = LIKE[family](config)
    validate(other, jax.device_count())
    other_train, other_info = compile_step(other, mesh)
    steps.append((f'{family} {size}', other, other_info, other_train))
  n_mm = _MATMUL_N.value
  if config.compute_dtype not in matmuls:
    matmuls[config.compute_dtype] = {'timer': matmul_timer(n_mm, config.compute_dtype)}
  mm = matmuls[config.compute_dtype]
  scan = None
  if 'mamba' in families:
    mamba_config = steps[1 + families.index('mamba')][1]
    scan = scan_timer(mamba_config)
    n_scans = sum(not mamba_lib.is_attention_layer(
        state_lib.model_spec(mamba_config), i) for i in range(mamba_config.model.num_layers))
  timers = [s[3] for s in steps] + ([scan] if scan else []) + [mm['timer']]
  with jax.set_mesh(mesh):
    for timer in timers:
      timer.warm_up(_WARMUP.value, _REPEAT_S.value)
    repeats = [[timer.repeat() for timer in timers] for _ in range(_REPEATS.value)]
  mm.setdefault('seconds', []).extend(r[-1] for r in repeats)
  mm_flops = 2.0 * n_mm ** 3 * jax.device_count()  # the step runs on every device
  rows = [_row(name, c, i, timer, [(r[j], r[-1]) for r in repeats], mm_flops)
          for j, (name, c, i, timer) in enumerate(steps)]
  at = {'dense': 0, **{family: j + 1 for j, family in enumerate(families)}}
  ratios = {family: statistics.median(r[at[family]] / r[at[REFERENCE.get(family, 'dense')]]
                                      for r in repeats) for family in families}
  if scan:
    ratios['scan_share'] = statistics.median(n_scans * r[len(steps)] / r[at['mamba']]
                                             for r in repeats)
  return rows, ratios


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  batch_sizes = _overrides(_BATCH.value, 'batch_sizes')
  seq_lens = _overrides(_SEQ.value, 'seq_lens')
  metrics.quiet_library_logs()
  dev = jax.devices()
  print(f'jax {jax.__version__}, {len(dev)} x {dev[0].device_kind} ({jax.default_backend()}),'
        f' {os.cpu_count()} host cores')

  matmuls = {}  # dtype -> {'timer', 'seconds': per-call seconds of every repeat}
  unknown = [f for f in _FAMILIES.value if f not in LIKE]
  if unknown:
    raise app.UsageError(f'--families: unknown {unknown}; known: {sorted(LIKE)}')
  rows, ratios = [], {}
  for size in _SIZES.value:
    size_rows, size_ratios = bench_size(
        size, batch_sizes.get(size), seq_lens.get(size), matmuls,
        families=tuple(_FAMILIES.value) if size == 'tiny' else ())
    ratios.update(size_ratios)
    rows.extend(size_rows)
    for row in size_rows:
      print(f'  timed {row["config"]}: {row["step_ms"]:.1f} ms/step '
            f'({row["steps_per_repeat"]} steps x {_REPEATS.value} repeats)', flush=True)
  for dtype in _MATMUL_DTYPES.value:  # dtypes no config computes in: timed on their own
    if dtype not in matmuls:
      timer = matmul_timer(_MATMUL_N.value, dtype)
      timer.warm_up(_WARMUP.value, _REPEAT_S.value)
      matmuls[dtype] = {'timer': timer,
                        'seconds': [timer.repeat() for _ in range(_REPEATS.value)]}
  n = _MATMUL_N.value
  mm_rows = [{'dtype': d, 'n': n, 'ms': statistics.median(m['seconds']) * 1e3,
              'flops_per_s': 2.0 * n ** 3 / statistics.median(m['seconds']),
              'repeats': len(m['seconds'])} for d, m in matmuls.items()]

  head = ('config', 'dtype', 'params', 'B x T', 'tokens/step', 'compile s', 'step ms',
          'tokens/s', 'model TFLOP/s', '/ matmul')
  table = [head] + [(r['config'], r['compute_dtype'], f'{r["params"] / 1e6:.2f}M',
                     f'{r["batch_size"]} x {r["seq_len"]}', str(r['tokens_per_step']),
                     f'{r["compile_s"]:.1f}', f'{r["step_ms"]:.1f}',
                     f'{r["tokens_per_s"]:,.0f}', f'{r["model_flops_per_s"] / 1e12:.4f}',
                     f'{r["matmul_flop_ratio"]:.3f}') for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(head))]
  print()
  for line in table:
    print('  '.join(c.rjust(w) for c, w in zip(line, widths)))
  print()
  for m in mm_rows:
    print(f'matmul {m["n"]}x{m["n"]} {m["dtype"]} inputs, float32 accumulation: '
          f'{m["ms"]:.2f} ms, {m["flops_per_s"] / 1e12:.4f} TFLOP/s per device')
  for r in rows:
    print(f'{r["config"]} / matmul flop ratio: {r["matmul_flop_ratio"]:.3f}')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'jax': jax.__version__, 'devices': [str(d) for d in dev],
                 'device_kind': dev[0].device_kind, 'train_steps': rows,
                 'matmuls': mm_rows,
                 **{f'{f}_{REFERENCE.get(f, "dense")}_step_time_ratio': r
                    for f, r in ratios.items() if f != 'scan_share'},
                 **({'mamba_scan_share': ratios['scan_share']} if 'scan_share' in ratios
                    else {})}, f, indent=1)
  for family in _FAMILIES.value:
    what = f'{family}/{REFERENCE.get(family, "dense")} step time ratio'
    if family not in ratios:
      print(f'{what}: not measured (families pair with tiny in --sizes)')
    else:
      print(f'{what}: {ratios[family]:.3f}')
  if 'scan_share' in ratios:
    print(f'mamba scan share of the step: {ratios["scan_share"]:.3f}')


if __name__ == '__main__':
  app.run(main)
