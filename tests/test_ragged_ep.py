"""Dropless expert parallelism with a ragged all-to-all (moe/parallel.py).

XLA:CPU cannot compile `jax.lax.ragged_all_to_all`, so the ragged path runs here with
`emulated_ragged_all_to_all`, which is first checked against a numpy version of the
collective's documented semantics; the real collective is only lowered.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from core import partitioning
from moe import layer, parallel
from moe.experts import Experts
from moe.routing import Routing

G, S, D, F, E, K = 8, 8, 8, 16, 8, 2  # G splits over 8 batch shards; D over fsdp, F over tensor


def axis_mesh(n):
  return jax.make_mesh((n,), ('expert',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def run_exchange(mesh, *args):
  """Per-device arrays stacked on a leading device axis -> emulated result, stacked."""
  def local(*a):
    return parallel.emulated_ragged_all_to_all(*(x[0] for x in a), axis_name='expert')[None]
  f = jax.shard_map(local, mesh=mesh, in_specs=(P('expert'),) * 6, out_specs=P('expert'))
  return np.asarray(jax.jit(f)(*map(jnp.asarray, args)))


def test_emulated_exchange_on_the_docstring_example():
  out = run_exchange(axis_mesh(2), [[1, 2, 2], [3, 4, 0]], [[0, 0, 0, 0]] * 2,
                     [[0, 1], [0, 1]], [[1, 2], [1, 1]], [[0, 0], [1, 2]], [[1, 1], [2, 1]])
  np.testing.assert_array_equal(out, [[1, 3, 0, 0], [2, 2, 4, 0]])


def place(sizes, length, rng):
  """Offsets of non-overlapping slices of `sizes` in [0, length), shuffled, with gaps."""
  order = rng.permutation(len(sizes))
  cuts = np.sort(rng.integers(0, length - sum(sizes) + 1, len(sizes)))  # gap before each
  offsets, end = np.zeros(len(sizes), np.int32), 0
  for i, gap in zip(order, np.diff(cuts, prepend=0)):
    offsets[i], end = end + gap, end + gap + sizes[i]
  return offsets


@pytest.mark.parametrize('per_device', [1, 2])
def test_emulated_exchange_equals_numpy_reference(per_device):
  n, rows, width = 8, 40, 3
  num = n * per_device  # slices per sender; slice i goes to device i // per_device
  rng = np.random.default_rng(per_device)
  sizes = rng.integers(0, 3, (n, num)).astype(np.int32)  # [sender, slice]
  operand = rng.normal(size=(n, rows, width)).astype(np.float32)
  output = rng.normal(size=(n, rows, width)).astype(np.float32)  # kept where not written
  in_off = np.stack([place(sizes[s], rows, rng) for s in range(n)])
  out_off, recv = np.zeros_like(sizes), np.zeros_like(sizes)
  for t in range(n):  # receiver t: incoming slot s * per_device + j = sender s's slice
    idx = [(s, t * per_device + j) for s in range(n) for j in range(per_device)]
    offs = place([sizes[si] for si in idx], rows, rng)
    for slot, (s, i) in enumerate(idx):
      out_off[s, i], recv[t, slot] = offs[slot], sizes[s, i]
  want = output.copy()
  for s in range(n):
    for i in range(num):
      t, o, m = i // per_device, out_off[s, i], sizes[s, i]
      want[t, o:o + m] = operand[s, in_off[s, i]:in_off[s, i] + m]
  got = run_exchange(axis_mesh(n), operand, output, in_off, sizes, out_off, recv)
  np.testing.assert_array_equal(got, want)


def uneven_routing(seed):
  """Skewed top-K pairs over random tokens: expert 3 gets nothing, expert 0 the most;
  ~20% invalid pairs holding garbage (bad token / expert, NaN weight); group 5 (one
  device's tokens on the 8-way meshes) all invalid."""
  rng = np.random.default_rng(seed)
  p = np.array([0.35, 0.15, 0.1, 0.0, 0.1, 0.1, 0.1, 0.1])
  expert = rng.choice(E, size=(G, S * K), p=p)
  token = rng.integers(0, S, (G, S * K))
  weight = rng.random((G, S * K))
  valid = rng.random((G, S * K)) > 0.2
  valid[5] = False
  expert = np.where(valid, expert, rng.choice([-1, E, 99], (G, S * K)))
  token = np.where(valid, token, S + 3)
  weight = np.where(valid, weight, np.nan)
  return Routing(token=jnp.asarray(token, jnp.int32), expert=jnp.asarray(expert, jnp.int32),
                 weight=jnp.asarray(weight, jnp.float32), valid=jnp.asarray(valid),
                 num_experts=E, group_size=S)


def loss_fn(graphdef, route, ct):
  def loss(x, weight, params):
    experts = nnx.merge(graphdef, params)
    y, stats = layer.run_experts(x, route.replace(weight=weight), experts, dropless=True,
                                 capacity=S, dtype=jnp.float32)
    return jnp.sum(y * ct), (y, stats)
  return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def mesh_of(shape):
  return partitioning.make_mesh(ml_collections.ConfigDict(dict(zip(partitioning.MESH_AXES, shape))))


MESHES = [(1, 1, 8, 1), (2, 1, 4, 1), (4, 1, 2, 1), (1, 2, 2, 2)]  # data, fsdp, expert, tensor


@pytest.fixture(scope='module')
def problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
  experts = Experts(num_experts=E, embed_dim=D, mlp_dim=F, dtype=jnp.float32,
                    param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(experts)
  route = uneven_routing(1)
  f = loss_fn(graphdef, route, ct)
  ref = jax.jit(f)(x, route.weight, params)  # no mesh: single-device dropless path
  return f, (x, route.weight, params), ref


@pytest.mark.parametrize('shape', MESHES, ids=lambda s: 'x'.join(map(str, s)))
def test_ragged_expert_parallel_equals_single_device_dropless(shape, problem, monkeypatch):
  f, args, ((_, (y_ref, stats_ref)), grads_ref) = problem
  calls = []
  real = parallel.ragged_expert_parallel
  monkeypatch.setattr(parallel, 'ragged_expert_parallel',
                      lambda *a, **kw: calls.append(kw['exchange']) or real(*a, **kw))
  monkeypatch.setattr(parallel, 'RAGGED_EP', 'emulate')
  with jax.set_mesh(mesh_of(shape)):
    (_, (y, stats)), grads = jax.jit(f)(*args)
  assert calls == [parallel.emulated_ragged_all_to_all]
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['expert_load'], stats_ref['expert_load'], rtol=1e-6)
  assert stats['expert_load'][3] == 0 and stats['dropped_fraction'] == 0
  assert np.all(np.isfinite(grads[1])) and np.all(np.asarray(grads[1])[5] == 0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads, grads_ref)


def lowered_text(mode, monkeypatch, grad):
  monkeypatch.setattr(parallel, 'RAGGED_EP', mode)
  graphdef, params = nnx.split(Experts(num_experts=E, embed_dim=D, mlp_dim=F,
                                       dtype=jnp.float32, param_dtype=jnp.float32,
                                       rngs=nnx.Rngs(0)))
  route = uneven_routing(2)
  f = loss_fn(graphdef, route, jnp.ones((G, S, D)))
  if not grad:
    f = lambda x, w, p: layer.run_experts(  # noqa: E731
        x, route.replace(weight=w), nnx.merge(graphdef, p), dropless=True, capacity=S,
        dtype=jnp.float32)[0]
  with jax.set_mesh(mesh_of((2, 1, 4, 1))):
    lowered = jax.jit(f).lower(jnp.zeros((G, S, D)), route.weight, params)
  return lowered.as_text(), lowered.as_text(dialect='hlo')


def test_real_ragged_all_to_all_lowers_forward_and_backward(monkeypatch):
  stablehlo, hlo = lowered_text('on', monkeypatch, grad=False)
  assert stablehlo.count('ragged_all_to_all') == 2  # rows out, results back
  assert hlo.count('ragged-all-to-all(') == 2
  stablehlo, hlo = lowered_text('on', monkeypatch, grad=True)
  assert hlo.count('ragged-all-to-all(') == 4  # + their transposes


def test_cpu_default_keeps_the_padded_path(monkeypatch):
  assert jax.default_backend() == 'cpu'
  monkeypatch.setattr(parallel, 'RAGGED_EP', 'auto')
  assert parallel.ragged_exchange() is None
  stablehlo, _ = lowered_text('auto', monkeypatch, grad=False)
  assert 'all_to_all' in stablehlo and 'ragged_all_to_all' not in stablehlo
  monkeypatch.setattr(parallel, 'RAGGED_EP', 'sometimes')
  with pytest.raises(ValueError, match='RAGGED_EP'):
    parallel.ragged_exchange()


def test_benchmark_script_checks_the_ragged_path_on_a_mesh():
  """benchmarks/ragged_ep.py (the GPU check of docs/moe.md) on 8 CPU devices, emulated
  exchange: both paths pass its numerical check against the one-device layer."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  out = subprocess.run(
      [sys.executable, 'benchmarks/ragged_ep.py', '--exchange=emulate', '--data=2',
       '--expert=4', '--groups=8', '--group_size=16', '--embed_dim=8', '--mlp_dim=16',
       '--repeats=1', '--repeat_seconds=0.01'],
      cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  assert out.stdout.count('[ok at') == 2 and 'ragged/padded time ratio:' in out.stdout
  assert "mesh {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}" in out.stdout
