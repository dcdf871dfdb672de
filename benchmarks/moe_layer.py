"""Forward + backward time of ONE MoE layer against a dense FFN and a matmul of equal FLOPs.

  python benchmarks/moe_layer.py                  # 2 CPU cores: ~1.5 min quiet, ~2.5 busy
  python benchmarks/moe_layer.py --blocks= --repeats=5          # no block-size sweep
  python benchmarks/moe_layer.py --impls=ragged_dot --blocks= --repeats=1   # + ragged_dot (slow on CPU)
  python benchmarks/moe_layer.py --impls=ragged_dot,blocks --compute_dtype=bfloat16   # GPU

Each variant is a jitted `grads(params, x)` of `sum(y * dy) + aux_loss` (gradients with
respect to the input and every parameter; `dy` a fixed random cotangent) on x [B, T, D] =
8 x 1024 x 512 by default, i.e. 8192 tokens in 8 routing groups of 1024 (group_size=0: one
group per sequence). Variants:

  dropless            moe/ MoELayer, dispatch='dropless', top-2 `topk_softmax`, E=8, F=2048:
                      sort + grouped SwiGLU with moe/grouped.py's 'auto' kernel ('blocks' on
                      CPU, 'batched' on GPU) at its default block
  dropless block=N    the same with the kernel's `block=N` (--blocks sweep; the Experts
                      module passes no block, so the sweep wraps grouped.grouped_swiglu while
                      the variant is traced)
  dropless <impl>     the same with grouped_impl=<impl> (--impls; XLA:CPU and XLA:GPU lower
                      'ragged_dot' to a dense product over all E experts, ~E x the FLOPs)
  capacity c=1.25     dispatch='capacity': padded [E, G*C, D] buffers, C = ceil(c*k*S/E)
  dense SwiGLU        core/layers.SwiGLU with F = k*F_expert = 4096: the same active FLOPs
  matmul              x <- x @ w, x [4*N*D/H, 3H/2], w [3H/2, 3H/2] (H = k*F): exactly the
                      dense FFN's forward + backward FLOPs (18*N*D*H) in one matmul

Model FLOPs are 6 x active matmul parameters per token (training/flops.py): k experts plus
the router for the MoE, the same for capacity (its padding is not counted). As in
benchmarks/train_step.py, compilation and --warmup calls are not timed, calls are chained
(each takes the previous call's output), and every repeat times each variant once in a
rotating order; the reported ms is the median over repeats and each ratio is the median of
the per-repeat ratios, so load changes hit all variants alike. The last line is
`moe/dense time ratio: X` for the dropless layer as it ships (default kernel, default
block). Results and their reading: docs/moe.md.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from core import layers  # noqa: E402
from core.layers import dtype_of  # noqa: E402
from moe import grouped, routing  # noqa: E402
from moe import layer as moe_layer  # noqa: E402
from benchmarks.timing import Timer  # noqa: E402
from training import metrics  # noqa: E402

_B = flags.DEFINE_integer('batch', 8, 'B: sequences (one routing group each by default).')
_T = flags.DEFINE_integer('seq_len', 1024, 'T: tokens per sequence.')
_GROUP = flags.DEFINE_integer('group_size', 0, 'MoESpec.group_size (0: one group per sequence).')
_D = flags.DEFINE_integer('embed_dim', 512, 'D.')
_F = flags.DEFINE_integer('mlp_dim', 2048, 'F of each expert (the dense FFN gets k*F).')
_E = flags.DEFINE_integer('experts', 8, 'E.')
_K = flags.DEFINE_integer('k', 2, 'Experts per token (topk_softmax).')
_CF = flags.DEFINE_float('capacity_factor', 1.25, 'c of the capacity variant.')
_BLOCKS = flags.DEFINE_list('blocks', ['512', '1024'],
                            'Extra block sizes of the CPU blocks kernel to time (the default '
                            'block is always timed as "dropless").')
_IMPLS = flags.DEFINE_list('impls', [],
                           "Other moe/grouped.py kernels to time as well ('ragged_dot', "
                           "'blocks', 'batched'; ragged_dot on CPU is ~E x the FLOPs: about "
                           '12x the dense layer, 20-45 s a call on 2 cores).')
_DTYPE = flags.DEFINE_enum('compute_dtype', 'float32', ['float32', 'bfloat16'],
                           'Compute dtype of every variant (parameters stay float32).')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed calls after compilation.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats; medians are reported.')
_REPEAT_S = flags.DEFINE_float('repeat_seconds', 1.0,
                               'Target length of one repeat of one variant (at least one call).')
_JSON = flags.DEFINE_string('json', '', 'Also write the results to this JSON file.')



@contextlib.contextmanager
def blocks_kernel_block(block: int | None):
  """While tracing, the dropless blocks kernel uses `block` rows per block (None: default)."""
  original = grouped.grouped_swiglu
  if block is not None:
    grouped.grouped_swiglu = functools.partial(original, block=block)
  try:
    yield
  finally:
    grouped.grouped_swiglu = original


def layer_timer(module: nnx.Module, x_BTD: jax.Array, dy_BTD: jax.Array,
                block: int | None = None) -> tuple[Timer, float]:
  """AOT-compiled fwd+bwd of `module` (returning y or (y, aux)); (timer, compile seconds)."""
  graphdef, params = nnx.split(module, nnx.Param)

  def loss(params, x):
    out = nnx.merge(graphdef, params)(x)
    y, aux = out if isinstance(out, tuple) else (out, {})
    return jnp.sum(y.astype(jnp.float32) * dy_BTD) + aux.get('aux_loss', 0.0)

  def step(params, x):
    g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
    # The next call's input depends on this call's gradients (1e-12 * g_x is far below an
    # ulp of x, so the values, and hence the routing, do not change).
    return x + 1e-12 * g_x, g_params

  t0 = time.perf_counter()
  with blocks_kernel_block(block):
    compiled = jax.jit(step).lower(params, x_BTD).compile()
  compile_s = time.perf_counter() - t0
  return Timer(lambda carry: compiled(params, carry[0]), (x_BTD, None)), compile_s


def matmul_timer(m: int, n: int, dtype) -> tuple[Timer, float]:
  """x <- x @ w with x [m, n], w [n, n] (scaled normal: row norms stay ~constant)."""
  kx, kw = jax.random.split(jax.random.key(2))
  x = jax.random.normal(kx, (m, n), jnp.float32).astype(dtype)
  w = (jax.random.normal(kw, (n, n), jnp.float32) * n ** -0.5).astype(dtype)
  t0 = time.perf_counter()
  mm = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(dtype))
  mm = mm.lower(x, w).compile()
  return Timer(lambda x: mm(x, w), x), time.perf_counter() - t0


def moe_module(dispatch: str, impl: str, dtype) -> moe_layer.MoELayer:
  router = routing.RouterConfig(name='topk_softmax', k=_K.value,
                                capacity_factor=None if dispatch == 'dropless' else _CF.value)
  spec = moe_layer.MoESpec(num_experts=_E.value, mlp_dim=_F.value, router=router,
                           dispatch=dispatch, group_size=_GROUP.value)
  moe_layer.check_moe_spec(spec, seq_len=_T.value, expert_shards=1)
  module = moe_layer.MoELayer(spec, embed_dim=_D.value, dtype=dtype, param_dtype=jnp.float32,
                              rngs=nnx.Rngs(0))
  module.experts.grouped_impl = impl
  return module


def routing_stats(module: moe_layer.MoELayer, x_BTD: jax.Array) -> dict[str, float]:
  """Load of the busiest expert (x the mean) and the capacity drop fraction, for this x."""
  _, aux = nnx.jit(lambda m, x: m(x))(module, x_BTD)
  load = aux['expert_load']
  return {'max_load_over_mean': float(jnp.max(load) * load.shape[0]),
          'dropped_fraction': float(aux['dropped_fraction'])}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  metrics.quiet_library_logs()
  dev = jax.devices()
  print(f'jax {jax.__version__}, {len(dev)} x {dev[0].device_kind} ({jax.default_backend()}),'
        f' {os.cpu_count()} host cores')
  B, T, D, F, E, k = _B.value, _T.value, _D.value, _F.value, _E.value, _K.value
  N, H = B * T, k * F  # tokens; hidden width of the equal-FLOPs dense FFN
  groups = N // (_GROUP.value or T)
  dtype = dtype_of(_DTYPE.value)
  kx, kdy = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (B, T, D), jnp.float32).astype(dtype)
  dy = jax.random.normal(kdy, (B, T, D), jnp.float32)
  dense_flops = 6.0 * N * 3 * D * H
  moe_flops = 6.0 * N * (k * 3 * D * F + D * E)  # k experts + the router
  mm_m, mm_n = 4 * N * D // H, 3 * H // 2
  if 2 * mm_m * mm_n * mm_n != 18 * N * D * H:
    raise app.UsageError(f'N*D={N * D} must be a multiple of H/4 and H={H} even, so the '
                         'reference matmul has exactly the dense FLOPs')
  print(f'{N} tokens = {groups} routing groups x {N // groups}; D={D}, F={F}, E={E}, '
        f'top-{k} topk_softmax; dense F={H}; {_DTYPE.value} compute')

  auto_impl = grouped.AUTO.get(jax.default_backend(), 'ragged_dot')  # grouped.py 'auto'
  blocked = auto_impl in grouped.BLOCK
  default_block = grouped.BLOCK.get(auto_impl)
  variants = []  # (name, flops, timer, compile_s, note)
  mm, mm_c = matmul_timer(mm_m, mm_n, dtype)
  variants.append(('matmul', dense_flops, mm, mm_c, f'[{mm_m},{mm_n}] @ [{mm_n},{mm_n}]'))
  dense = layers.SwiGLU(embed_dim=D, mlp_dim=H, dtype=dtype, param_dtype=jnp.float32,
                        rngs=nnx.Rngs(0))
  variants.append(('dense SwiGLU', dense_flops, *layer_timer(dense, x, dy), f'F={H}'))
  moe_runs = [('dropless', 'dropless', 'auto', None,
               auto_impl + (f', block={default_block}' if blocked else ''))]
  moe_runs += [(f'dropless block={b}', 'dropless', auto_impl, int(b), f'{auto_impl}, block={b}')
               for b in _BLOCKS.value if blocked and int(b) != default_block]
  for impl in _IMPLS.value:
    if impl not in grouped.IMPLS:
      raise app.UsageError(f'--impls: unknown {impl!r}; known: {grouped.IMPLS}')
    if impl != auto_impl:
      moe_runs.append((f'dropless {impl}', 'dropless', impl, None,
                       impl + (f', block={grouped.BLOCK[impl]}' if impl in grouped.BLOCK
                               else '')))
  moe_runs.append((f'capacity c={_CF.value:g}', 'capacity', 'auto', None,
                   f'C={routing.capacity(N // groups, E, k, _CF.value)} per group'))
  stats = {}
  for name, dispatch, impl, block, note in moe_runs:
    module = moe_module(dispatch, impl, dtype)
    if dispatch not in stats:
      stats[dispatch] = routing_stats(module, x)
    variants.append((name, moe_flops, *layer_timer(module, x, dy, block), note))
    print(f'  compiled {name} ({variants[-1][3]:.1f} s)', flush=True)
  s = stats['dropless']
  print(f'routing on this input: busiest expert {s["max_load_over_mean"]:.3f} x the mean load; '
        f'capacity path drops {stats["capacity"]["dropped_fraction"]:.2%} of the pairs')

  for _, _, timer, _, _ in variants:
    timer.warm_up(_WARMUP.value, _REPEAT_S.value)
  seconds = {v[0]: [] for v in variants}
  for r in range(_REPEATS.value):  # every variant once per repeat, in a rotating order
    for name, _, timer, _, _ in variants[r % len(variants):] + variants[:r % len(variants)]:
      seconds[name].append(timer.repeat())
    print(f'  repeat {r + 1}/{_REPEATS.value}: '
          + ', '.join(f'{n} {t[-1] * 1e3:.0f}' for n, t in seconds.items()) + ' ms', flush=True)

  rows = []
  dense_s = seconds['dense SwiGLU']
  for name, model_flops, timer, compile_s, note in variants:
    sec = statistics.median(seconds[name])
    rows.append({'variant': name, 'note': note, 'ms': sec * 1e3, 'calls': timer.calls,
                 'compile_s': compile_s,
                 'over_dense': statistics.median(t / d for t, d in zip(seconds[name], dense_s)),
                 'model_flops': model_flops, 'model_flops_per_s': model_flops / sec})
  head = ('variant', 'kernel / shape', 'ms', '/ dense', 'model TFLOP/s', 'compile s')
  table = [head] + [(r['variant'], r['note'], f'{r["ms"]:.4g}', f'{r["over_dense"]:.3f}',
                     f'{r["model_flops_per_s"] / 1e12:.4f}', f'{r["compile_s"]:.1f}')
                    for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(head))]
  print()
  for line in table:
    print('  '.join(c.rjust(w) for c, w in zip(line, widths)))
  print()
  print(f'({_REPEATS.value} repeats; ms and ratios are medians; model FLOPs per call: '
        f'dense/matmul {dense_flops / 1e9:.1f} G, MoE {moe_flops / 1e9:.1f} G)')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'jax': jax.__version__, 'devices': [str(d) for d in dev],
                 'tokens': N, 'groups': groups, 'routing': stats, 'rows': rows,
                 'seconds': seconds}, f, indent=1)
  by_name = {r['variant']: r for r in rows}
  for r in rows[2:]:
    if r['variant'] != 'dropless':
      print(f'{r["variant"]} / dense time ratio: {r["over_dense"]:.3f}')
  dense_mm = statistics.median(d / m for d, m in zip(dense_s, seconds['matmul']))
  print(f'dense / matmul time ratio: {dense_mm:.3f}')
  print(f'moe/dense time ratio: {by_name["dropless"]["over_dense"]:.3f}')


if __name__ == '__main__':
  app.run(main)
