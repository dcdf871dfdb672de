"""Capacity and dropless dispatch/combine against a per-pair loop in float64, with gradients.

Routings are built here (random logits -> jax.lax.top_k, or by hand); only the `Routing`
dataclass of moe/routing.py is used.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe import dispatch, grouped
from moe.experts import Experts, swiglu
from moe.routing import Routing

G, S, D, F, E, K = 2, 16, 8, 16, 4, 2


def make_experts(dtype=jnp.float32, seed=0):
  return Experts(num_experts=E, embed_dim=D, mlp_dim=F, dtype=dtype, param_dtype=jnp.float32,
                 rngs=nnx.Rngs(seed))


def topk_routing(seed, k=K, invalid_fraction=0.0):
  """Token-choice top-k, token-major pairs (P = S*k), softmax gates; some pairs invalid."""
  key1, key2 = jax.random.split(jax.random.key(seed))
  probs = jax.nn.softmax(jax.random.normal(key1, (G, S, E)), axis=-1)
  weight, expert = jax.lax.top_k(probs, k)  # [G, S, k]
  token = jnp.broadcast_to(jnp.arange(S)[None, :, None], (G, S, k))
  valid = jax.random.uniform(key2, (G, S * k)) >= invalid_fraction
  return Routing(token=token.reshape(G, -1).astype(jnp.int32),
                 expert=expert.reshape(G, -1).astype(jnp.int32),
                 weight=jnp.where(valid, weight.reshape(G, -1), 0.0), valid=valid,
                 num_experts=E, group_size=S)


def expert_choice_routing(seed, capacity):
  """Each expert takes its top `capacity` tokens: P = E*C, expert-major, sigmoid gates."""
  scores = jax.nn.sigmoid(jax.random.normal(jax.random.key(seed), (G, S, E)))
  weight, token = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)  # [G, E, C]
  expert = jnp.broadcast_to(jnp.arange(E)[None, :, None], token.shape)
  return Routing(token=token.reshape(G, -1).astype(jnp.int32),
                 expert=expert.reshape(G, -1).astype(jnp.int32),
                 weight=weight.reshape(G, -1), valid=jnp.ones((G, E * capacity), bool),
                 num_experts=E, group_size=S)


def np_params(experts):
  return [np.asarray(w[...], np.float64) for w in (experts.w_gate, experts.w_up, experts.w_down)]


def loop_reference(x, routing, params, capacity=None):
  """Walk the pairs of each group in order: (y [G, S, D] float64, kept [G, P], #dropped)."""
  token, expert, weight, valid = (np.asarray(a) for a in
                                  (routing.token, routing.expert, routing.weight, routing.valid))
  x = np.asarray(x, np.float64)
  wg, wu, wd = params
  y = np.zeros(x.shape)
  kept = np.zeros(token.shape, bool)
  dropped = 0
  for g in range(token.shape[0]):
    used = np.zeros(E, int)
    for p in range(token.shape[1]):
      if not valid[g, p]:
        continue
      e, s = expert[g, p], token[g, p]
      used[e] += 1
      if capacity is not None and used[e] > capacity:
        dropped += 1
        continue
      kept[g, p] = True
      a = x[g, s] @ wg[e]
      y[g, s] += weight[g, p] * (((a / (1 + np.exp(-a))) * (x[g, s] @ wu[e])) @ wd[e])
  return y, kept, dropped


def jnp_reference(x, weight, params, routing, kept):
  """Same function in jnp (every expert on every token, then select pairs), for jax.grad."""
  out = jax.vmap(swiglu, in_axes=(None, 0, 0, 0))(x, *params)  # [E, G, S, D]
  g = jnp.arange(G)[:, None]
  per_pair = out[jnp.clip(routing.expert, 0, E - 1), g, jnp.clip(routing.token, 0, S - 1)]
  gate = jax.nn.one_hot(routing.token, S) * jnp.where(kept, weight, 0.0)[..., None]
  return jnp.einsum('GPS,GPD->GSD', gate, per_pair)


@functools.partial(jax.jit, static_argnames=('graphdef', 'capacity'))
def run(graphdef, state, x, weight, routing, capacity):
  """y and stats of one path (capacity=None: dropless), and grads of <y, ct>."""
  ct = jax.random.normal(jax.random.key(7), x.shape)

  def loss(x, weight, state):
    experts = nnx.merge(graphdef, state)
    r = routing.replace(weight=weight)
    if capacity is None:
      y, stats = dispatch.dropless_dispatch_combine(x, r, experts)
    else:
      y, stats = dispatch.capacity_dispatch_combine(x, r, experts.dense_apply, capacity)
    return jnp.sum(y * ct), (y, stats)

  grads, (y, stats) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, weight, state)
  return y, stats, grads


def check_against_reference(routing, capacity, seed=0):
  """Forward vs the float64 loop, gradients (x, weight, params) vs grad of jnp_reference."""
  experts = make_experts(seed=seed)
  graphdef, state = nnx.split(experts)
  x = jax.random.normal(jax.random.key(seed + 100), (G, S, D))
  y, stats, (gx, gw, gstate) = run(graphdef, state, x, routing.weight, routing, capacity)
  want, kept, dropped = loop_reference(x, routing, np_params(experts), capacity)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
  num_valid = int(np.asarray(routing.valid).sum())
  np.testing.assert_allclose(float(stats['dropped_fraction']), dropped / max(num_valid, 1),
                             atol=1e-7)

  ct = jax.random.normal(jax.random.key(7), x.shape)
  params = tuple(w[...] for w in (experts.w_gate, experts.w_up, experts.w_down))
  want_grads = jax.grad(lambda x, w, p: jnp.sum(jnp_reference(x, w, p, routing, kept) * ct),
                        argnums=(0, 1, 2))(x, routing.weight, params)
  got_params = (gstate['w_gate'][...], gstate['w_up'][...], gstate['w_down'][...])
  for got, want_g in zip((gx, gw) + got_params, want_grads[:2] + want_grads[2]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want_g), rtol=1e-4, atol=1e-5)
  return y, stats, kept, dropped


@pytest.mark.parametrize('capacity', [5, 2 * S * K])
def test_capacity_path_matches_loop_reference(capacity):
  routing = topk_routing(seed=1, invalid_fraction=0.1)
  _, stats, _, dropped = check_against_reference(routing, capacity)
  # C = 5 < the ~8 pairs per expert per group drops some; C = P drops none.
  assert (dropped > 0) == (capacity == 5), dropped
  fill = np.asarray(stats['expert_fill'])
  assert fill.shape == (E,) and np.all(fill <= 1.0)
  np.testing.assert_allclose(np.asarray(stats['expert_load']).sum(), 1.0, rtol=1e-6)


def test_dropless_path_matches_loop_reference():
  routing = topk_routing(seed=2, invalid_fraction=0.1)
  _, stats, kept, dropped = check_against_reference(routing, None)
  assert dropped == 0 and kept.sum() == np.asarray(routing.valid).sum()
  counts = np.bincount(np.asarray(routing.expert)[np.asarray(routing.valid)], minlength=E)
  np.testing.assert_allclose(np.asarray(stats['expert_load']), counts / counts.sum(),
                             rtol=1e-6)


@pytest.mark.parametrize('capacity', [None, 4, 2])
def test_expert_choice_routing_through_both_paths(capacity):
  """P = E*C expert-major; a token may be picked by 0..E experts. With the capacity equal
  to the expert-choice C nothing is dropped; with 2 each expert keeps its first 2 pairs."""
  routing = expert_choice_routing(seed=3, capacity=4)
  token = np.asarray(routing.token)
  picks = np.stack([np.bincount(t, minlength=S) for t in token])
  assert picks.min() == 0 and picks.max() >= 2  # the case this test is about
  _, _, kept, dropped = check_against_reference(routing, capacity)
  assert dropped == (G * E * 2 if capacity == 2 else 0)


def test_dropless_equals_capacity_without_drops():
  experts = make_experts(seed=4)
  graphdef, state = nnx.split(experts)
  routing = topk_routing(seed=4, invalid_fraction=0.2)
  x = jax.random.normal(jax.random.key(5), (G, S, D))
  P = routing.token.shape[1]
  y_cap, stats, grads_cap = run(graphdef, state, x, routing.weight, routing, P)
  y_dl, _, grads_dl = run(graphdef, state, x, routing.weight, routing, None)
  assert float(stats['dropped_fraction']) == 0.0
  np.testing.assert_allclose(np.asarray(y_cap), np.asarray(y_dl), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_cap), jax.tree.leaves(grads_dl)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_hand_counted_drops_give_exact_zeros():
  """One group, capacity 1: invalid pairs take no slot; fully dropped tokens get exactly 0."""
  experts = Experts(num_experts=2, embed_dim=D, mlp_dim=F, dtype=jnp.float32,
                    param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  #        pair: 0      1     2     3     4     5     6
  token = [[0, 1, 2, 2, 3, 3, 0]]
  expert = [[0, 0, 0, 1, 0, 1, 1]]
  valid = [[False, True, True, True, True, True, False]]
  # kept: pair 1 (expert 0, slot 0) and pair 3 (expert 1, slot 0); pairs 2, 4, 5 dropped.
  routing = Routing(token=jnp.array(token, jnp.int32), expert=jnp.array(expert, jnp.int32),
                    weight=jnp.array([[0., .5, .7, .3, .6, .4, 0.]]),
                    valid=jnp.array(valid), num_experts=2, group_size=4)
  x = jax.random.normal(jax.random.key(0), (1, 4, D))
  f = jax.jit(lambda x: dispatch.capacity_dispatch_combine(x, routing, experts.dense_apply, 1))
  y, stats = f(x)
  gx = jax.grad(lambda x: jnp.sum(f(x)[0] ** 2))(x)
  assert np.all(np.asarray(y[0, 0]) == 0) and np.all(np.asarray(y[0, 3]) == 0)
  assert np.all(np.asarray(gx[0, 0]) == 0) and np.all(np.asarray(gx[0, 3]) == 0)
  p = [np.asarray(w[...], np.float64) for w in (experts.w_gate, experts.w_up, experts.w_down)]
  ffn = lambda v, e: np.asarray(swiglu(v, p[0][e], p[1][e], p[2][e]))
  xn = np.asarray(x, np.float64)
  np.testing.assert_allclose(np.asarray(y[0, 1]), 0.5 * ffn(xn[0, 1], 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(y[0, 2]), 0.3 * ffn(xn[0, 2], 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(stats['dropped_fraction']), 3 / 5, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(stats['expert_fill']), [1.0, 1.0])
  np.testing.assert_allclose(np.asarray(stats['expert_load']), [3 / 5, 2 / 5], rtol=1e-6)


@pytest.mark.parametrize('capacity', [None, 6])
def test_invalid_pairs_are_ignored_whatever_they_hold(capacity):
  """Garbage (out-of-range indices, NaN weights) in invalid pairs changes nothing."""
  experts = make_experts(seed=6)
  graphdef, state = nnx.split(experts)
  clean = topk_routing(seed=6, invalid_fraction=0.3)
  inv = ~clean.valid
  rng = np.random.default_rng(0)
  dirty = clean.replace(
      token=jnp.where(inv, jnp.asarray(rng.choice([-1, 0, S, S + 3], inv.shape)), clean.token),
      expert=jnp.where(inv, jnp.asarray(rng.choice([-1, 0, E, E + 2], inv.shape)),
                       clean.expert),
      weight=jnp.where(inv, jnp.nan, clean.weight))
  x = jax.random.normal(jax.random.key(6), (G, S, D))
  y_clean, _, g_clean = run(graphdef, state, x, clean.weight, clean, capacity)
  y_dirty, _, g_dirty = run(graphdef, state, x, dirty.weight, dirty, capacity)
  np.testing.assert_array_equal(np.asarray(y_clean), np.asarray(y_dirty))
  for a, b in zip(jax.tree.leaves(g_clean), jax.tree.leaves(g_dirty)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.all(np.asarray(g_dirty[1])[np.asarray(inv)] == 0)  # no gradient to their weights
  want, _, _ = loop_reference(x, clean, np_params(experts), capacity)
  np.testing.assert_allclose(np.asarray(y_dirty), want, rtol=1e-5, atol=1e-5)


def test_expert_fn_sees_expert_leading_buffers():
  """expert_fn gets [E, G*C, D] with row e for expert e and row j = (group j//C, slot j%C)."""
  C = 3
  routing = topk_routing(seed=8)
  x = jax.random.normal(jax.random.key(8), (G, S, D))
  buffers, info = dispatch.capacity_dispatch(x, routing, C)
  assert buffers.shape == (E, G * C, D)
  _, kept, _ = loop_reference(x, routing, np_params(make_experts()), C)
  token, expert = np.asarray(routing.token), np.asarray(routing.expert)
  want = np.zeros((E, G, C, D), np.float32)
  for g in range(G):
    slots = np.zeros(E, int)
    for p in np.flatnonzero(kept[g]):
      want[expert[g, p], g, slots[expert[g, p]]] = np.asarray(x[g, token[g, p]])
      slots[expert[g, p]] += 1
  np.testing.assert_array_equal(np.asarray(buffers), want.reshape(E, G * C, D))
  # A per-expert scale as expert_fn: combine must apply expert e's scale to its pairs.
  scale = jnp.arange(1.0, E + 1.0)[:, None, None]
  y = dispatch.capacity_combine(buffers * scale, info)
  w = np.where(kept, np.asarray(routing.weight), 0.0)
  want_y = np.zeros((G, S, D))
  for g, p in zip(*np.nonzero(kept)):
    want_y[g, token[g, p]] += w[g, p] * (expert[g, p] + 1) * np.asarray(x[g, token[g, p]])
  np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-6, atol=1e-6)


def test_experts_params_and_apply_methods():
  experts = make_experts(seed=9)
  for name, shape, axes in [('w_gate', (E, D, F), ('expert', 'embed', 'mlp')),
                            ('w_up', (E, D, F), ('expert', 'embed', 'mlp')),
                            ('w_down', (E, F, D), ('expert', 'mlp', 'embed'))]:
    w = getattr(experts, name)
    assert w[...].shape == shape and w[...].dtype == jnp.float32
    assert tuple(w.out_sharding) == axes
  p = np_params(experts)
  x = np.random.default_rng(9).normal(size=(E, 5, D)).astype(np.float32)
  want = np.stack([np.asarray(swiglu(x[e].astype(np.float64), p[0][e], p[1][e], p[2][e]))
                   for e in range(E)])
  np.testing.assert_allclose(np.asarray(experts.dense_apply(jnp.asarray(x))), want,
                             rtol=1e-5, atol=1e-6)
  sizes = np.array([3, 0, 6, 2])  # an empty group in the middle; 1 trailing row in none
  rows = np.random.default_rng(10).normal(size=(12, D)).astype(np.float32)
  got = np.asarray(experts.ragged_apply(jnp.asarray(rows), jnp.asarray(sizes, jnp.int32)))
  owner = np.repeat(np.arange(E), sizes)
  want = np.stack([np.asarray(swiglu(rows[i].astype(np.float64), p[0][e], p[1][e], p[2][e]))
                   for i, e in enumerate(owner)])
  np.testing.assert_allclose(got[:11], want, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_x_dtype_and_stays_close():
  experts = make_experts(dtype=jnp.bfloat16, seed=11)
  routing = topk_routing(seed=11)
  x = jax.random.normal(jax.random.key(11), (G, S, D))
  want, _, _ = loop_reference(x, routing, np_params(experts), capacity=None)
  P = routing.token.shape[1]
  paths = {
      'capacity': lambda x: dispatch.capacity_dispatch_combine(
          x, routing, experts.dense_apply, P, dtype=jnp.bfloat16)[0],
      'dropless': lambda x: dispatch.dropless_dispatch_combine(x, routing, experts)[0],
  }
  scale = np.abs(want).max()
  for name, f in paths.items():
    y = jax.jit(f)(x)
    assert y.dtype == jnp.float32, name
    np.testing.assert_allclose(np.asarray(y), want, atol=0.03 * scale, err_msg=name)
    assert jax.jit(f)(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16, name


@pytest.mark.parametrize('impl,block', [('ragged_dot', 0), ('tokamax', 0), ('blocks', 2), ('blocks', 4),
                                        ('blocks', 256), ('batched', 4), ('batched', 256)])
def test_grouped_kernels_match_per_row_reference(impl, block):
  """moe/grouped.py: every kernel, blocks smaller and larger than the groups, an empty group,
  a spare trailing row (must come out 0), values and gradients."""
  experts = make_experts(seed=11)
  w = tuple(v[...] for v in (experts.w_gate, experts.w_up, experts.w_down))
  sizes = jnp.asarray([3, 0, 6, 2], jnp.int32)
  rows = jnp.asarray(np.random.default_rng(12).normal(size=(12, D)), jnp.float32)
  owner = np.repeat(np.arange(E), np.asarray(sizes))
  kw = {'impl': impl, 'block': block} if block else {'impl': impl}
  ct = jnp.asarray(np.random.default_rng(13).normal(size=(12, D)), jnp.float32)

  def got_fn(rows, w):
    return jnp.sum(grouped.grouped_swiglu(rows, *w, sizes, **kw) * ct)

  def want_fn(rows, w):
    ys = [swiglu(rows[i], w[0][e], w[1][e], w[2][e]) for i, e in enumerate(owner)]
    return jnp.sum(jnp.stack(ys) * ct[:11])

  out = grouped.grouped_swiglu(rows, *w, sizes, **kw)
  np.testing.assert_array_equal(np.asarray(out[11]), 0.0)
  np.testing.assert_allclose(float(got_fn(rows, w)), float(want_fn(rows, w)), rtol=1e-5)
  for g, h in zip(jax.tree.leaves(jax.grad(got_fn, argnums=(0, 1))(rows, w)),
                  jax.tree.leaves(jax.grad(want_fn, argnums=(0, 1))(rows, w))):
    np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-5)
