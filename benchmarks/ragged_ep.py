"""Dropless expert parallelism on the devices at hand: check the real ragged all-to-all, then time it.

  python benchmarks/ragged_ep.py                       # GPU/TPU: every local device on 'expert'
  python benchmarks/ragged_ep.py --expert=4 --data=2   # 8 devices: data 2 x expert 4

One dropless MoE step (E=8 SwiGLU experts, top-2 over skewed router logits, so expert loads
are uneven) is computed as a jitted `value_and_grad` of `sum(y * dy)` with respect to x, the
routing weights and the expert weights, three ways:

  reference   no mesh: moe/dispatch.py dropless sort + grouped matmul on one device
  ragged      moe/parallel.py ragged_expert_parallel with jax.lax.ragged_all_to_all, under
              the mesh (data, fsdp, expert, tensor) given by the flags: only real rows travel
  padded      moe/layer.py run_experts with parallel.RAGGED_EP='off' under the same mesh:
              capacity-padded all_to_all buffers with capacity = S, so it drops nothing
              (with expert=1 there is no exchange and this is the one-device dropless path)

It prints, for `ragged` and `padded`, the largest relative error of y and of every gradient
against the reference, the ragged-all-to-all / all-to-all counts in the compiled HLO, and
the median time of each variant over repeats taken in one run (ratios to the reference).
The last line is `ragged/padded time ratio: X`. XLA:CPU cannot compile ragged all-to-all:
on CPU use `--exchange=emulate` (the same exchange built from all_to_all; tests/).
Results: docs/moe.md.
"""

from __future__ import annotations

import os
import statistics
import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.timing import Timer  # noqa: E402
from moe import layer, parallel, routing  # noqa: E402
from moe.experts import Experts  # noqa: E402
from core import partitioning  # noqa: E402
from training import metrics  # noqa: E402

_G = flags.DEFINE_integer('groups', 8, 'Routing groups (sequences); split over the batch axes.')
_S = flags.DEFINE_integer('group_size', 1024, 'S: tokens per routing group.')
_D = flags.DEFINE_integer('embed_dim', 512, 'D.')
_F = flags.DEFINE_integer('mlp_dim', 2048, 'F of each expert.')
_E = flags.DEFINE_integer('experts', 8, 'E.')
_K = flags.DEFINE_integer('k', 2, 'Experts per token.')
_SKEW = flags.DEFINE_float('skew', 1.5, 'Per-expert logit offsets linspace(skew, -skew): the '
                           'first experts get most of the rows.')
_DTYPE = flags.DEFINE_enum('compute_dtype', 'float32', ['float32', 'bfloat16'], 'Row dtype.')
_EXCHANGE = flags.DEFINE_enum('exchange', 'real', ['real', 'emulate'],
                              'real: jax.lax.ragged_all_to_all; emulate: its all_to_all form.')
_MESH = {a: flags.DEFINE_integer(a, -1 if a == 'expert' else 1,
                                 f'Mesh axis {a} (-1: the remaining devices).')
         for a in partitioning.MESH_AXES}
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats; medians are reported.')
_REPEAT_S = flags.DEFINE_float('repeat_seconds', 0.5, 'Target length of one repeat.')


def problem():
  G, S, D, E = _G.value, _S.value, _D.value, _E.value
  kx, kl, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (G, S, D), jnp.float32)
  logits = jax.random.normal(kl, (G, S, E)) + jnp.linspace(_SKEW.value, -_SKEW.value, E)
  config = routing.RouterConfig(name='topk_softmax', k=_K.value, capacity_factor=None)
  route, _ = routing.route(config, logits)
  dy = jax.random.normal(kc, (G, S, D), jnp.float32)
  experts = Experts(num_experts=E, embed_dim=D, mlp_dim=_F.value, dtype=jnp.float32,
                    param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(experts)
  return graphdef, params, route, x, dy


def grad_fn(variant, graphdef, route, dy, dtype):
  """(x, weight, params) -> ((loss, y), grads) of the dropless layer computed by `variant`."""
  S = route.group_size

  def loss(x, weight, params):
    r = route.replace(weight=weight)
    experts = nnx.merge(graphdef, params)
    if variant == 'ragged':
      exchange = (jax.lax.ragged_all_to_all if _EXCHANGE.value == 'real'
                  else parallel.emulated_ragged_all_to_all)
      y, _ = parallel.ragged_expert_parallel(
          x, r, experts.w_gate[...], experts.w_up[...], experts.w_down[...], dtype,
          exchange=exchange)
    else:  # reference (no mesh) or padded (RAGGED_EP='off' under the mesh)
      y, _ = layer.run_experts(x, r, experts, dropless=True, capacity=S, dtype=dtype)
    return jnp.sum(y.astype(jnp.float32) * dy), y

  return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  metrics.quiet_library_logs()
  dev = jax.devices()
  print(f'jax {jax.__version__}, {len(dev)} x {dev[0].device_kind} ({jax.default_backend()})')
  import ml_collections  # pylint: disable=import-outside-toplevel
  mesh = partitioning.make_mesh(ml_collections.ConfigDict({a: f.value for a, f in _MESH.items()}))
  dtype = jnp.dtype(_DTYPE.value)
  graphdef, params, route, x, dy = problem()
  load = np.bincount(np.asarray(route.expert).ravel(), minlength=_E.value) / route.expert.size
  print(f'mesh {dict(mesh.shape)}; {_G.value} groups x {_S.value} tokens, D={_D.value}, '
        f'F={_F.value}, E={_E.value}, top-{_K.value}, {_DTYPE.value} rows; expert load '
        + ' '.join(f'{v:.3f}' for v in load))

  args = (x, route.weight, params)
  compiled, hlo = {}, {}
  ref_fn = jax.jit(grad_fn('reference', graphdef, route, dy, dtype))
  compiled['reference'] = ref_fn.lower(*args).compile()
  (_, y_ref), g_ref = compiled['reference'](*args)
  old = parallel.RAGGED_EP
  parallel.RAGGED_EP = 'off'
  try:
    with jax.set_mesh(mesh):
      for variant in ('ragged', 'padded'):
        c = jax.jit(grad_fn(variant, graphdef, route, dy, dtype)).lower(*args).compile()
        compiled[variant], hlo[variant] = c, c.as_text()
  finally:
    parallel.RAGGED_EP = old

  tol = 1e-4 if dtype == jnp.float32 else 3e-2
  failed = []
  for variant in ('ragged', 'padded'):
    (_, y), g = compiled[variant](*args)
    errs = {'y': rel_err(y, y_ref), 'dx': rel_err(g[0], g_ref[0]),
            'dweight': rel_err(g[1], g_ref[1])}
    errs.update({f'd{k}': rel_err(v, g_ref[2][k]) for k, v in g[2].items()})
    worst = max(errs.values())
    failed += [variant] * (not worst <= tol)
    text = hlo[variant]
    print(f'{variant:>7}: ragged-all-to-all x{text.count("ragged-all-to-all(")}, '
          f'all-to-all x{text.count(" all-to-all(")}; rel. error vs reference: '
          + ', '.join(f'{k} {v:.1e}' for k, v in errs.items())
          + f'  [{"ok" if worst <= tol else "FAIL"} at {tol:g}]')

  timers = {name: Timer(lambda _, c=c: c(*args), None) for name, c in compiled.items()}
  for t in timers.values():
    t.warm_up(1, _REPEAT_S.value)
  seconds = {name: [] for name in timers}
  names = list(timers)
  for r in range(_REPEATS.value):
    for name in names[r % 3:] + names[:r % 3]:
      seconds[name].append(timers[name].repeat())
  print(f'\n{"variant":>10} {"ms":>9} {"/ reference":>12}')
  for name, s in seconds.items():
    ratio = statistics.median(a / b for a, b in zip(s, seconds['reference']))
    print(f'{name:>10} {statistics.median(s) * 1e3:9.4g} {ratio:12.3f}')
  print(f'\n({_REPEATS.value} repeats; medians)')
  ratio = statistics.median(a / b for a, b in zip(seconds['ragged'], seconds['padded']))
  print(f'ragged/padded time ratio: {ratio:.3f}')
  if failed:
    raise SystemExit(f'numerical check failed for {failed}')


if __name__ == '__main__':
  app.run(main)
