"""Routers against plain numpy references and hand-computed numbers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import routing
from moe.routing import RouterConfig

ROUTE = jax.jit(routing.route, static_argnums=0)
METRIC_KEYS = {'aux_loss', 'load_balance_loss', 'z_loss', 'expert_load', 'dropped_fraction',
               'router_entropy', 'experts_per_token'}


def _logits(G, S, E, seed=0):
  return np.random.default_rng(seed).normal(size=(G, S, E)).astype(np.float32)


def _np_softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


@pytest.mark.parametrize('name,renormalize', [('topk_softmax', False), ('topk_softmax', True),
                                              ('topk_sigmoid', False), ('topk_sigmoid', True)])
def test_topk_picks_largest_logits_in_order_with_weights(name, renormalize):
  G, S, E, k = 3, 5, 6, 3
  x = _logits(G, S, E)
  r, _ = ROUTE(RouterConfig(name, k=k, renormalize=renormalize), jnp.asarray(x))
  want_expert = np.argsort(-x, axis=-1, kind='stable')[..., :k]  # [G, S, k], descending
  scores = _np_softmax(x) if name == 'topk_softmax' else _np_sigmoid(x)
  want_w = np.take_along_axis(scores, want_expert, -1)
  if renormalize:
    want_w = want_w / want_w.sum(-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(r.expert).reshape(G, S, k), want_expert)
  np.testing.assert_array_equal(np.asarray(r.token).reshape(G, S, k),
                                np.broadcast_to(np.arange(S)[None, :, None], (G, S, k)))
  np.testing.assert_allclose(np.asarray(r.weight).reshape(G, S, k), want_w, rtol=1e-5)
  assert np.asarray(r.valid).all() and r.token.shape == (G, S * k)
  assert (r.num_experts, r.group_size) == (E, S)
  if renormalize:
    np.testing.assert_allclose(np.asarray(r.weight).reshape(G, S, k).sum(-1), 1.0, rtol=1e-6)


def test_sigmoid_weights_and_order_survive_saturation():
  # sigmoid(30) == sigmoid(20) == 1 in float32, but the ranking must still follow the logits.
  x = jnp.asarray([[[20.0, 30.0, -5.0, 25.0]]])
  r, _ = ROUTE(RouterConfig('topk_sigmoid', k=3), x)
  np.testing.assert_array_equal(np.asarray(r.expert)[0], [1, 3, 0])
  r, _ = ROUTE(RouterConfig('topk_sigmoid', k=2, renormalize=True), x)
  np.testing.assert_allclose(np.asarray(r.weight)[0], [0.5, 0.5], rtol=1e-6)
  r, _ = ROUTE(RouterConfig('expert_choice_sigmoid', capacity_factor=4.0),
               jnp.asarray([[[20.0], [30.0], [25.0], [-1.0]]]))
  np.testing.assert_array_equal(np.asarray(r.token)[0], [1, 2, 0, 3])


@pytest.mark.parametrize('name,G,S,E,c', [('expert_choice', 2, 12, 4, 1.0),
                                           ('expert_choice', 1, 7, 8, 2.0),
                                           ('expert_choice_sigmoid', 3, 10, 3, 1.5),
                                           ('expert_choice_sigmoid', 2, 9, 4, 0.5)])
def test_expert_choice_takes_top_c_of_each_column(name, G, S, E, c):
  x = _logits(G, S, E, seed=S + E)
  config = RouterConfig(name, capacity_factor=c, load_balance_coef=0.0)
  C = config.capacity(S, E)
  assert C == max(1, min(S, math.ceil(c * S / E)))
  r, m = ROUTE(config, jnp.asarray(x))
  scores = _np_softmax(x) if name == 'expert_choice' else _np_sigmoid(x)
  token = np.asarray(r.token).reshape(G, E, C)
  expert = np.asarray(r.expert).reshape(G, E, C)
  weight = np.asarray(r.weight).reshape(G, E, C)
  for g in range(G):
    for e in range(E):
      want = np.argsort(-scores[g, :, e], kind='stable')[:C]
      np.testing.assert_array_equal(token[g, e], want)
      np.testing.assert_array_equal(expert[g, e], np.full(C, e))
      np.testing.assert_allclose(weight[g, e], scores[g, want, e], rtol=1e-5)
    np.testing.assert_array_equal(np.bincount(expert[g].ravel(), minlength=E), np.full(E, C))
  np.testing.assert_allclose(np.asarray(m['expert_load']), np.full(E, 1.0 / E), rtol=1e-6)
  picked = np.zeros((G, S), bool)
  for g in range(G):
    picked[g, token[g].ravel()] = True
  np.testing.assert_allclose(float(m['dropped_fraction']), 1.0 - picked.mean(), atol=1e-6)


def test_expert_choice_dropped_tokens_by_hand():
  # 6 tokens, 3 experts, c = 1 -> C = ceil(6/3) = 2. Experts 0 and 1 both take tokens 0, 1
  # (column probs ~0.499, ~0.495; the next is token 5 at 1/3); expert 2 takes tokens 2, 3
  # (0.909, 0.859; token 4 has 0.691). Tokens 4 and 5 get no expert: 2 of 6 dropped.
  x = jnp.asarray([[[2.0, 2.0, -2.0], [1.9, 1.9, -2.0], [0.0, 0.0, 3.0],
                    [0.0, 0.0, 2.5], [-1.0, -1.0, 0.5], [0.0, 0.0, 0.0]]])
  r, m = ROUTE(RouterConfig('expert_choice', capacity_factor=1.0), x)
  np.testing.assert_array_equal(np.asarray(r.token)[0], [0, 1, 0, 1, 2, 3])
  np.testing.assert_array_equal(np.asarray(r.expert)[0], [0, 0, 1, 1, 2, 2])
  np.testing.assert_allclose(np.asarray(r.weight)[0, 4:],
                             [math.e ** 3 / (math.e ** 3 + 2), math.e ** 2.5 / (math.e ** 2.5 + 2)],
                             rtol=1e-6)
  np.testing.assert_allclose(float(m['dropped_fraction']), 2 / 6, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(m['expert_load']), [1 / 3] * 3, rtol=1e-6)


def test_batch_prioritized_orders_pairs_by_top_probability():
  G, S, E, k = 2, 9, 5, 2
  x = _logits(G, S, E, seed=3)
  plain, m_plain = ROUTE(RouterConfig('topk_softmax', k=k), jnp.asarray(x))
  bpr, m_bpr = ROUTE(RouterConfig('batch_prioritized', k=k), jnp.asarray(x))
  top_p = _np_softmax(x).max(-1)  # [G, S]
  for g in range(G):
    pairs = lambda r: sorted(zip(np.asarray(r.token)[g].tolist(), np.asarray(r.expert)[g].tolist(),
                                 np.round(np.asarray(r.weight)[g], 6).tolist()))
    assert pairs(bpr) == pairs(plain)
    order = np.argsort(-top_p[g], kind='stable')
    tok = np.asarray(bpr.token)[g].reshape(k, S)
    exp = np.asarray(bpr.expert)[g].reshape(k, S)
    for j in range(k):  # choice-major: every j-th choice precedes every (j+1)-th choice
      np.testing.assert_array_equal(tok[j], order)
      assert np.all(np.diff(top_p[g][tok[j]]) <= 0)
      np.testing.assert_array_equal(exp[j], np.argsort(-x[g], -1, kind='stable')[tok[j], j])
  for key in METRIC_KEYS:
    np.testing.assert_allclose(np.asarray(m_bpr[key]), np.asarray(m_plain[key]), rtol=1e-6)


def test_batch_prioritized_first_come_capacity_drops_least_confident():
  # What a capacity dispatch does with the pair order: admit pairs first-come, C per expert.
  S, E, C = 16, 4, 2
  x = _logits(1, S, E, seed=7)
  r, _ = ROUTE(RouterConfig('batch_prioritized', k=1), jnp.asarray(x))
  top_p = _np_softmax(x)[0].max(-1)
  used, admitted = np.zeros(E, int), {e: [] for e in range(E)}
  dropped = {e: [] for e in range(E)}
  for t, e in zip(np.asarray(r.token)[0], np.asarray(r.expert)[0]):
    (admitted if used[e] < C else dropped)[e].append(top_p[t])
    used[e] += 1
  assert any(dropped.values())
  for e in range(E):
    if dropped[e]:
      assert min(admitted[e]) >= max(dropped[e])


def test_aux_losses_and_entropy_by_hand():
  # 4 tokens, 2 experts. Softmax probs: t0 (.75, .25), t1 (.25, .75), t2 (.75, .25), t3 (.6, .4).
  # Top-1: 0, 1, 0, 0 -> f = (3/4, 1/4). P = mean probs = (2.35/4, 1.65/4) = (.5875, .4125).
  # load balance = E * sum f*P = 2 * (.75 * .5875 + .25 * .4125) = 2 * .54375 = 1.0875.
  # logsumexp = ln 4, ln 4, ln 4, ln 2.5 -> z = (3 ln(4)^2 + ln(2.5)^2) / 4.
  # entropy: H(.75, .25) = .562335, H(.6, .4) = .673012 -> mean = (3 * .562335 + .673012) / 4.
  x = jnp.asarray([[[math.log(3), 0.0], [0.0, math.log(3)], [math.log(3), 0.0],
                    [math.log(1.5), 0.0]]])
  config = RouterConfig('topk_softmax', k=1, load_balance_coef=0.01, z_loss_coef=1e-3)
  _, m = ROUTE(config, x)
  assert set(m) == METRIC_KEYS
  z = (3 * math.log(4) ** 2 + math.log(2.5) ** 2) / 4
  np.testing.assert_allclose(float(m['load_balance_loss']), 1.0875, rtol=1e-6)
  np.testing.assert_allclose(float(m['z_loss']), z, rtol=1e-6)
  np.testing.assert_allclose(float(m['aux_loss']), 0.01 * 1.0875 + 1e-3 * z, rtol=1e-6)
  np.testing.assert_allclose(float(m['router_entropy']), (3 * 0.562335 + 0.673012) / 4,
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(m['expert_load']), [0.75, 0.25], rtol=1e-6)
  assert float(m['dropped_fraction']) == 0.0


@pytest.mark.parametrize('name', sorted(set(routing.ROUTERS) - routing.GATED))
def test_metrics_match_numpy(name):  # the gated routers: tests/test_dense_to_sparse.py
  G, S, E = 2, 8, 4
  x = _logits(G, S, E, seed=11)
  kw = {} if name.startswith('expert') else {'k': 2}
  config = RouterConfig(name, load_balance_coef=0.1, z_loss_coef=0.01, **kw)
  r, m = ROUTE(config, jnp.asarray(x))
  assert set(m) == METRIC_KEYS
  eager = routing.route(config, jnp.asarray(x))
  for a, b in zip(jax.tree.leaves((r, m)), jax.tree.leaves(eager)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  # Sigmoid routers: the routing distribution is the normalised sigmoid scores.
  p = _np_sigmoid(x) if 'sigmoid' in name else _np_softmax(x)
  p = p / p.sum(-1, keepdims=True)
  f = np.eye(E)[x.argmax(-1)].mean(1)  # [G, E]
  lb = np.mean(E * (f * p.mean(1)).sum(-1))
  lse = np.log(np.exp(x.astype(np.float64)).sum(-1))
  np.testing.assert_allclose(float(m['load_balance_loss']), lb, rtol=1e-5)
  np.testing.assert_allclose(float(m['z_loss']), np.mean(lse ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(m['aux_loss']), 0.1 * lb + 0.01 * np.mean(lse ** 2),
                             rtol=1e-5)
  np.testing.assert_allclose(float(m['router_entropy']),
                             np.mean(-(p * np.log(p)).sum(-1)), rtol=1e-5)
  assert m['expert_load'].shape == (E,)
  np.testing.assert_allclose(float(jnp.sum(m['expert_load'])), 1.0, rtol=1e-6)
  for v in m.values():
    assert v.dtype == jnp.float32


@pytest.mark.parametrize('name,renormalize', [
    ('topk_softmax', False), ('topk_softmax', True), ('topk_sigmoid', True),
    ('batch_prioritized', False), ('expert_choice', False), ('expert_choice_sigmoid', False)])
def test_weights_are_differentiable(name, renormalize):
  G, S, E = 2, 6, 4
  x = jnp.asarray(_logits(G, S, E, seed=5))
  kw = {} if name.startswith('expert') else {'k': 2, 'renormalize': renormalize}
  config = RouterConfig(name, **kw)
  P = E * config.capacity(S, E) if name.startswith('expert') else S * 2
  coef = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.5, (G, P)), jnp.float32)

  @jax.jit
  def routing_and_grads(l):
    weighted = lambda l: jnp.sum(coef * routing.route(config, l)[0].weight)
    aux = lambda l: routing.route(config, l)[1]['aux_loss']
    return routing.route(config, l)[0], jax.grad(weighted)(l), jax.grad(aux)(l)

  r, grad, aux_grad = routing_and_grads(x)
  grad = np.asarray(grad)
  for g in range(G):
    for t, e in zip(np.asarray(r.token)[g], np.asarray(r.expert)[g]):
      assert grad[g, t, e] != 0, (g, t, e)
  assert np.all(np.isfinite(aux_grad)) and np.any(aux_grad != 0)


def test_capacity_formula():
  assert routing.capacity(8, 4, 2, 1.0) == 4  # token choice: ceil(c k S / E)
  assert routing.capacity(8, 4, 2, 1.25) == 5
  assert routing.capacity(100, 11, 1, 1.1) == 10  # 10.000000000000002 without rounding
  assert routing.capacity(4, 1, 2, 2.0) == 4  # at most S
  assert routing.capacity(2, 64, 1, 1.0) == 1  # at least 1
  assert RouterConfig('expert_choice', capacity_factor=1.0).capacity(10, 4) == 3  # ceil(c S / E)
  assert RouterConfig('topk_softmax', k=2, capacity_factor=1.0).capacity(10, 4) == 5
  assert RouterConfig('topk_softmax', capacity_factor=None).capacity(10, 4) is None


@pytest.mark.parametrize('config,num_experts,match', [
    (RouterConfig('top_k'), 4, 'unknown router'),
    (RouterConfig('topk_softmax', k=5), 4, 'k must be in'),
    (RouterConfig('batch_prioritized', k=0), 4, 'k must be in'),
    (RouterConfig('topk_softmax', capacity_factor=0.0), 4, 'capacity_factor must be > 0'),
    (RouterConfig('expert_choice', capacity_factor=-1.0), 4, 'capacity_factor must be > 0'),
    (RouterConfig('expert_choice', capacity_factor=None), 4, 'needs a capacity_factor'),
    (RouterConfig('expert_choice', renormalize=True), 4, 'renormalize'),
    (RouterConfig('topk_sigmoid', jitter=1.0), 4, 'jitter'),
    (RouterConfig('topk_sigmoid', z_loss_coef=-1.0), 4, 'coefficients'),
])
def test_bad_configs_raise(config, num_experts, match):
  with pytest.raises(ValueError, match=match):
    routing.check_router_config(config, num_experts)


def test_valid_configs_pass_and_route_checks_shapes():
  routing.check_router_config(RouterConfig('topk_softmax', k=4, capacity_factor=None), 4)
  routing.check_router_config(RouterConfig('expert_choice_sigmoid', k=8), 1)  # k unused
  with pytest.raises(ValueError, match='k must be in'):
    routing.route(RouterConfig('topk_softmax', k=3), jnp.zeros((1, 4, 2)))


@pytest.mark.parametrize('name', sorted(routing.ROUTERS))
def test_one_expert_and_bfloat16_logits(name):
  # E = 1 (e.g. a modality with a single expert): every router sends each token to it.
  G, S = 2, 7
  x = jnp.asarray(_logits(G, S, 1), jnp.bfloat16)  # cast to float32 inside
  config = RouterConfig(name, **({} if name.startswith('expert') else {'k': 1}))
  r, m = ROUTE(config, x)
  assert r.token.shape == (G, S) and r.weight.dtype == jnp.float32
  np.testing.assert_array_equal(np.sort(np.asarray(r.token), -1), np.tile(np.arange(S), (G, 1)))
  want_w = (1.0 if 'sigmoid' not in name else
            _np_sigmoid(np.asarray(x.astype(jnp.float32)))[..., 0])
  np.testing.assert_allclose(np.asarray(r.weight), np.broadcast_to(want_w, (G, S))
                             [np.arange(G)[:, None], np.asarray(r.token)], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(m['expert_load']), [1.0])
  assert float(m['dropped_fraction']) == 0.0 and m['z_loss'].dtype == jnp.float32


def test_jitter_is_bounded_multiplicative_noise():
  x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (64, 16)), jnp.float32)
  y = routing.jitter(x, jax.random.key(0), 0.1)
  ratio = np.asarray(y / x)
  assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6 and ratio.std() > 0.03
  np.testing.assert_array_equal(np.asarray(routing.jitter(x, jax.random.key(0), 0.1)), y)
  assert routing.jitter(x, jax.random.key(0), 0.0) is x
  assert routing.jitter(x.astype(jnp.bfloat16), jax.random.key(1), 0.1).dtype == jnp.bfloat16


@pytest.mark.parametrize('name', ['topk_softmax', 'expert_choice'])
def test_token_mask_keeps_masked_tokens_out_of_the_metrics(name):
  """Metrics over the unmasked tokens equal those of the unmasked tokens alone; expert
  choice picks no masked token while unmasked ones are left."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 8, 4)).astype(np.float32)
  mask = np.zeros((2, 8), bool)
  mask[:, :6] = True
  config = RouterConfig(name, k=2, capacity_factor=1.0)
  route, metrics = routing.route(config, jnp.asarray(logits), jnp.asarray(mask))
  _, alone = routing.route(RouterConfig(name, k=2, capacity_factor=1.0 * 8 / 6),
                           jnp.asarray(logits[:, :6]))
  for key in ('z_loss', 'load_balance_loss', 'router_entropy', 'aux_loss'):
    np.testing.assert_allclose(metrics[key], alone[key], rtol=1e-5, err_msg=key)
  if name == 'expert_choice':
    assert np.all(np.asarray(route.token) < 6)
