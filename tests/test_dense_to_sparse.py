"""The dense-to-sparse gates (moe/routing.py `evomoe`, `activation_gate`): schedules, phases,
the aux loss by hand, the reduction to the softmax gate, the MoE layer against a float64
per-token loop, the step reaching the router in training, spawning from a dense run, and
one-line config errors."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import moe as moe_configs
from models import moe_ffn, transformer, upcycle
from moe import layer as moe_layer
from moe import routing
from moe.routing import RouterConfig
from tests.helpers import loss_and_grads, tiny_config
from training import checkpoint, loop, metrics, state as state_lib
from training.validate import validate

EVO = dict(name='evomoe', capacity_factor=None, temperature='exponential', tau=1.0,
           tau_min=0.5, tau_steps=100, threshold=0.001, hard_step=60)


def _logits(G, S, E, seed=0, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=(G, S, E)), jnp.float32)


@pytest.mark.parametrize('kind, want', [
    ('exponential', {0: 1.0, 25: 0.5 ** 0.25, 50: 0.5 ** 0.5, 100: 0.5, 400: 0.5}),
    ('linear', {0: 1.0, 25: 0.875, 50: 0.75, 100: 0.5, 400: 0.5}),
    ('fixed', {0: 1.0, 50: 1.0, 400: 1.0}),
])
def test_temperature_schedule_values(kind, want):
  config = RouterConfig(**{**EVO, 'temperature': kind})
  for step, tau in want.items():
    np.testing.assert_allclose(float(routing.temperature(config, jnp.int32(step))), tau,
                               rtol=1e-6, err_msg=f'{kind} at step {step}')
  # EvoMoE's form max(tau0 exp(t ln(tau_min / tau0) / T), tau_min) for the exponential one
  if kind == 'exponential':
    for t in (7, 33, 99, 150):
      np.testing.assert_allclose(float(routing.temperature(config, jnp.int32(t))),
                                 max(math.exp(t * math.log(0.5) / 100), 0.5), rtol=1e-6)
  # no step (decoding): the schedule's end; learned: exp(log_tau)
  end = float(routing.temperature(config, None))
  assert end == pytest.approx(0.5 if kind != 'fixed' else 1.0)
  learned = RouterConfig(**{**EVO, 'temperature': 'learned'})
  assert float(routing.temperature(learned, jnp.int32(3), jnp.log(2.5))) == pytest.approx(2.5)


def test_large_tau_uses_nearly_every_expert_and_the_hard_phase_exactly_one():
  E = 8
  logits = _logits(2, 16, E, scale=2.0)
  key = jax.random.key(0)
  hot = RouterConfig(**{**EVO, 'k': E, 'temperature': 'fixed', 'tau': 1000.0})
  route, m = routing.route(hot, logits, step=jnp.int32(0), key=key)
  assert float(m['experts_per_token']) == E  # g ~ 1/E > 0.001 for every expert
  np.testing.assert_allclose(np.asarray(route.weight).sum(-1), 16.0, rtol=1e-5)  # g sums to 1
  cold = RouterConfig(**{**EVO, 'k': E, 'temperature': 'fixed', 'tau': 0.01})
  _, m = routing.route(cold, logits, step=jnp.int32(0), key=key)
  assert 1.0 <= float(m['experts_per_token']) < 1.5  # a sharp gate: most tokens use one
  soft_then_hard = RouterConfig(**{**EVO, 'k': E})
  _, soft = routing.route(soft_then_hard, logits, step=jnp.int32(59), key=key)
  hard_route, hard = routing.route(soft_then_hard, logits, step=jnp.int32(60), key=key)
  assert float(soft['experts_per_token']) > 2 and float(hard['experts_per_token']) == 1.0
  valid = np.asarray(hard_route.valid).reshape(2, 16, E)
  assert valid[..., 0].all() and not valid[..., 1:].any()
  # the hard phase keeps the (noisy) argmax and its gate value
  noisy = logits + jax.random.gumbel(key, logits.shape)
  g = jax.nn.softmax(noisy / routing.temperature(soft_then_hard, jnp.int32(60)), -1)
  np.testing.assert_array_equal(np.asarray(hard_route.expert).reshape(2, 16, E)[..., 0],
                                np.argmax(np.asarray(noisy), -1))
  np.testing.assert_allclose(np.asarray(hard_route.weight).reshape(2, 16, E)[..., 0],
                             np.max(np.asarray(g), -1), rtol=1e-5)
  # evaluation (no key): top-1 without noise, whatever the step
  eval_route, ev = routing.route(soft_then_hard, logits, step=jnp.int32(0))
  assert float(ev['experts_per_token']) == 1.0
  np.testing.assert_array_equal(np.asarray(eval_route.expert).reshape(2, 16, E)[..., 0],
                                np.argmax(np.asarray(logits), -1))


def test_aux_loss_equals_a_hand_computation():
  """EvoMoE: E^2 * mean_e(mean_t g_e * mean_t chosen_e); one group of 2 tokens, 2 experts."""
  logits = jnp.asarray([[[math.log(3.0), 0.0], [0.0, math.log(4.0)]]], jnp.float32)
  config = RouterConfig(name='evomoe', k=2, capacity_factor=None, threshold=0.3,
                        load_balance_coef=0.5, z_loss_coef=0.0)
  route, m = routing.route(config, logits, step=jnp.int32(0), key=None)
  # eval has no noise: tau = 1, g = (0.75, 0.25) and (0.2, 0.8); top-1 only at eval
  config_train = RouterConfig(name='activation_gate', k=2, capacity_factor=None,
                              threshold=0.22, load_balance_coef=0.5, z_loss_coef=0.0)
  _, mt = routing.route(config_train, logits, step=jnp.int32(0))
  # token 0 uses e0 (0.75) and e1 (0.25 > 0.22); token 1 uses e1 only (0.2 <= 0.22)
  P = np.array([(0.75 + 0.2) / 2, (0.25 + 0.8) / 2])
  f = np.array([1 / 2, 2 / 2])
  want = 2 ** 2 * np.mean(P * f)
  np.testing.assert_allclose(float(mt['load_balance_loss']), want, rtol=1e-6)
  np.testing.assert_allclose(float(mt['aux_loss']), 0.5 * want, rtol=1e-6)
  assert float(mt['experts_per_token']) == 1.5
  np.testing.assert_allclose(np.asarray(mt['expert_load']), [1 / 3, 2 / 3], rtol=1e-6)
  # the evomoe eval routing: each token's top expert, f = (1/2, 1/2)
  np.testing.assert_allclose(float(m['load_balance_loss']), 4 * np.mean(P * [0.5, 0.5]),
                             rtol=1e-6)


@pytest.mark.parametrize('k', [1, 3])
def test_identity_activation_gate_is_the_softmax_gate(k):
  logits = _logits(2, 12, 6, seed=4)
  gate = RouterConfig(name='activation_gate', k=k, capacity_factor=None)
  plain = RouterConfig(name='topk_softmax', k=k, capacity_factor=None)
  (r1, m1), (r2, m2) = routing.route(gate, logits), routing.route(plain, logits)
  np.testing.assert_array_equal(np.asarray(r1.expert), np.asarray(r2.expert))
  np.testing.assert_array_equal(np.asarray(r1.token), np.asarray(r2.token))
  np.testing.assert_allclose(np.asarray(r1.weight), np.asarray(r2.weight), rtol=1e-6)
  assert np.asarray(r1.valid).all()
  keys = ['z_loss', 'router_entropy', 'expert_load', 'experts_per_token']
  if k == 1:  # f = the top-1 fraction for both: the Switch loss itself
    keys += ['load_balance_loss', 'aux_loss']
  for key in keys:
    np.testing.assert_allclose(np.asarray(m1[key]), np.asarray(m2[key]), rtol=1e-6,
                               err_msg=key)


def _np_swiglu(x, wg, wu, wd):
  g = x @ wg
  return (g / (1 + np.exp(-g)) * (x @ wu)) @ wd


@pytest.mark.parametrize('name, extra, draw', [
    ('evomoe', dict(temperature='exponential', tau_steps=10, threshold=0.05, hard_step=-1),
     dict(step=4, key=True)),
    ('evomoe', dict(temperature='exponential', tau_steps=10, threshold=0.05, hard_step=3),
     dict(step=4, key=True)),
    ('evomoe', dict(temperature='linear', tau_steps=10, threshold=0.05, hard_step=3),
     dict(step=4, key=False)),
    ('activation_gate', dict(activation='sigmoid', temperature='learned', threshold=0.2),
     dict(step=4, key=True)),
    ('activation_gate', dict(activation='tanh', tau=0.3, renormalize=True),
     dict(step=None, key=False)),
])
def test_moe_layer_equals_a_per_token_loop(name, extra, draw):
  """The layer with a gated router against float64 numpy, token by token: the same noise,
  temperature, bias, threshold and phase."""
  D, F, E, k, B, T = 8, 16, 4, 3, 2, 6
  router = RouterConfig(name=name, k=k, capacity_factor=None, **extra)
  spec = moe_layer.MoESpec(num_experts=E, mlp_dim=F, router=router)
  layer = moe_layer.MoELayer(spec, embed_dim=D, dtype=jnp.float32, param_dtype=jnp.float32,
                             rngs=nnx.Rngs(0))
  if hasattr(layer, 'router_bias'):
    layer.router_bias[...] = jnp.linspace(-0.5, 0.5, E)
  if hasattr(layer, 'log_temperature'):
    layer.log_temperature[...] = jnp.log(0.7)
  layer.router[...] = layer.router[...] * 30  # sharp enough that the threshold bites
  x = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, D)), jnp.float32)
  key = jax.random.key(7) if draw['key'] else None
  step = None if draw['step'] is None else jnp.int32(draw['step'])
  y, aux = layer(x, routing.Draw(key=key, step=step))

  p = {n: np.asarray(v[...], np.float64) for n, v in
       (('wr', layer.router), ('wg', layer.experts.w_gate), ('wu', layer.experts.w_up),
        ('wd', layer.experts.w_down))}
  logits = np.asarray(x, np.float64) @ p['wr']
  if name == 'activation_gate':
    logits = logits + np.linspace(-0.5, 0.5, E)
  scores = {'identity': lambda a: a, 'sigmoid': lambda a: 1 / (1 + np.exp(-a)),
            'tanh': np.tanh}[router.activation](logits)
  if name == 'evomoe' and key is not None:
    scores = scores + np.asarray(jax.random.gumbel(jax.random.fold_in(key, 1), (B, T, E)),
                                 np.float64)
  tau = (0.7 if router.temperature == 'learned' else
         float(routing.temperature(router, step)))
  hard = router.hard_step >= 0 and (step is None or draw['step'] >= router.hard_step)
  want = np.zeros((B, T, D))
  used = []
  for b in range(B):
    for t in range(T):
      g = np.exp(scores[b, t] / tau - np.max(scores[b, t] / tau))
      g /= g.sum()
      order = np.argsort(-g, kind='stable')[:k]
      if name == 'evomoe' and key is None or hard:
        chosen = order[:1]
      else:
        chosen = [e for j, e in enumerate(order) if j == 0 or g[e] > router.threshold]
      w = g[chosen] / g[chosen].sum() if router.renormalize else g[chosen]
      used.append(len(chosen))
      for e, we in zip(chosen, w):
        want[b, t] += we * _np_swiglu(np.asarray(x[b, t], np.float64), p['wg'][e],
                                      p['wu'][e], p['wd'][e])
  np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(float(aux['experts_per_token']), np.mean(used), rtol=1e-6)
  np.testing.assert_allclose(float(aux['temperature']), tau, rtol=1e-6)
  assert 1 < np.mean(used) < k or hard or key is None or router.threshold == 0


def _gated_config(arg, **overrides):
  return tiny_config(moe_configs.get_config(f'tiny,{arg}'),
                     **{'model.moe.mlp_dim': 64, 'model.moe.every': 1, **overrides})


def test_training_logs_the_schedule_and_the_phase_every_step(data_dir, tmp_path):
  """The step reaches the router: the logged temperature is the schedule's at each step,
  the hard phase uses one expert per token, and the learned gate's tau trains without
  weight decay."""
  config = _gated_config('experts=4,router=evomoe,tau_steps=2,hard_step=3', total_steps=4,
                         log_every=1, checkpoint_every=4, warmup_steps=0,
                         **{'data.data_dir': data_dir})
  assert config.model.moe.k == 4 and config.model.moe.threshold == 0.001
  loop.train(config, str(tmp_path))
  rows = metrics.read_metrics(str(tmp_path))
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  for row, tau in zip(rows, (1.0, 0.5 ** 0.5, 0.5, 0.5)):
    for i in range(2):
      assert row[f'train/layer_{i}/temperature'] == pytest.approx(tau, rel=1e-6)
  soft = [r['train/layer_0/experts_per_token'] for r in rows[:3]]
  assert min(soft) > 1.5, soft  # the soft phase, a near-uniform gate at init
  assert rows[3]['train/layer_0/experts_per_token'] == 1.0  # step index 3: hard


def test_learned_temperature_gets_a_gradient_and_no_weight_decay():
  config = _gated_config('experts=4,router=activation_gate')
  params = nnx.to_pure_dict(nnx.state(state_lib.make_model(config, 0), nnx.Param))
  mask = state_lib.decay_mask(params)
  for i in range(2):
    ffn, ffn_mask = params['blocks'][i]['ffn'], mask['blocks'][i]['ffn']
    assert ffn['log_temperature'].shape == () and ffn['router_bias'].shape == (4,)
    assert not ffn_mask['log_temperature'] and not ffn_mask['router_bias']
    np.testing.assert_allclose(ffn['log_temperature'], 0.0)  # tau = 1 at init
  _, grads, _ = loss_and_grads(config, jax.devices()[:1])
  for i in range(2):
    assert abs(float(grads['blocks'][i]['ffn']['log_temperature'])) > 0
    assert np.abs(grads['blocks'][i]['ffn']['router_bias']).sum() > 0


def test_old_configs_read_back_with_the_gate_keys():
  config = moe_configs.get_config('tiny')
  saved = json.loads(config.to_json())
  for key in (*moe_configs.GATE_KEYS, 'spawn', 'spawn_noise'):
    saved['model']['moe'].pop(key)
  assert checkpoint.config_changes(saved, config) == []
  back = checkpoint.config_from_saved(saved)
  assert json.loads(back.to_json())['model'] == json.loads(config.to_json())['model']


@pytest.mark.parametrize('spawn', ['copy', 'noise'])
def test_spawning_from_a_dense_model(spawn):
  """EvoMoE's spawn through the upcycling path: every expert the dense FFN, plus noise of
  the asked scale under 'noise'; attention and embeddings copied."""
  dense = tiny_config()
  arg = f'experts=4,router=evomoe,slices=1,spawn={spawn},spawn_noise=0.1'
  new = _gated_config(arg, upcycle_from='runs/x')
  new.model.moe.mlp_dim = dense.model.mlp_dim
  validate(new, 1)
  spec = lambda c: transformer.spec_from_config(c.model, param_dtype='float32',
                                                compute_dtype='float32')
  src = nnx.to_pure_dict(nnx.state(state_lib.make_model(dense, 0), nnx.Param))
  fresh = nnx.to_pure_dict(nnx.state(state_lib.make_model(new, 1), nnx.Param))
  out = upcycle.upcycle(spec(dense), src, spec(new), fresh)
  for i in range(2):
    for name in upcycle.FFN_WEIGHTS:
      w = np.asarray(out['blocks'][i]['ffn']['experts'][name])
      s = np.asarray(src['blocks'][i]['ffn'][name])
      d = w - s[None]
      if spawn == 'copy':
        np.testing.assert_array_equal(d, 0)
      else:
        np.testing.assert_allclose(d.std(), 0.1 * s.std(), rtol=0.1)
        assert np.abs(d[0] - d[1]).max() > 0  # every expert its own noise
    np.testing.assert_array_equal(np.asarray(out['blocks'][i]['attn']['wq']),
                                  np.asarray(src['blocks'][i]['attn']['wq']))
  assert 'spawned from the dense FFN' in upcycle.describe_target(spec(new))


BAD = [  # (config arg, overrides, words of the one error)
    ('router=activation_gate,activation=relu6', {}, "unknown activation 'relu6'"),
    ('router=evomoe,tau=0', {}, 'tau must be a number > 0, got 0.0'),
    ('router=evomoe,tau_min=-1', {}, 'tau_min must be a number > 0'),
    ('router=evomoe', {'model.moe.k': 9}, 'k must be in [1, num_experts=8], got k=9'),
    ('router=evomoe,threshold=1.5', {}, 'threshold must be in [0, 1)'),
    ('router=evomoe,temperature=cosine', {}, "unknown temperature 'cosine'"),
    ('router=evomoe,temperature=linear,tau_steps=0', {}, 'tau_steps must be an integer >= 1'),
    ('router=activation_gate,hard_step=5', {}, "hard_step is the evomoe gate's"),
    ('router=evomoe,activation=tanh', {}, 'evomoe takes no activation'),
    ('router=topk_softmax', {'model.moe.temperature': 'learned'},
     "router 'topk_softmax' takes no temperature"),
    ('router=evomoe,spawn=noise', {}, 'spawn=noise needs model.moe.spawn_noise > 0'),
    ('router=evomoe,spawn=shuffle', {}, "spawn='shuffle' is not one of"),
]


@pytest.mark.parametrize('arg, overrides, message', BAD, ids=[m[:30] for _, _, m in BAD])
def test_bad_gate_configs_give_one_clear_error(arg, overrides, message):
  with pytest.raises(ValueError) as err:
    validate(_gated_config(arg, **overrides), 8)
  assert message in str(err.value) and '\n' not in str(err.value), str(err.value)


def test_bad_gate_config_args():
  with pytest.raises(ValueError, match="config arg tau='hot' must be a finite number"):
    moe_configs.get_config('tiny,router=evomoe,tau=hot')
