"""The MoE decoder: expert parallelism computes the single-device function, experts are
really split over the `expert` axis, and bad MoE configs fail before compilation."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import moe as moe_config
from core import partitioning
from moe import layer as moe_layer, routing
from tests.helpers import loss_and_grads, random_batch, tiny_config
from training import state as state_lib, step as step_lib
from training.validate import validate


def moe_tiny(**overrides):
  return tiny_config(base=moe_config.get_config('tiny'),
                     **{'model.moe.mlp_dim': 128, **overrides})


@pytest.fixture(scope='module')
def reference():
  loss, grads, _ = loss_and_grads(moe_tiny(**{'mesh.data': 1}), jax.devices()[:1])
  return loss, grads


MESHES = [(1, 1, 8, 1), (2, 1, 4, 1), (4, 1, 2, 1), (1, 2, 2, 2)]


@pytest.mark.parametrize('shape', MESHES, ids=lambda s: 'x'.join(map(str, s)))
def test_expert_parallel_equals_single_device(shape, reference):
  config = moe_tiny(**{f'mesh.{a}': s for a, s in zip(partitioning.MESH_AXES, shape)})
  loss, grads, params = loss_and_grads(config, jax.devices())
  np.testing.assert_allclose(loss, reference[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               grads, reference[1])
  w = params['blocks'][1]['ffn']['experts']['w_gate'][...]
  assert w.shape[0] == 8
  # Per device: 1/expert of the experts, and 1/(fsdp*tensor) of each expert's matrix.
  assert w.addressable_shards[0].data.size == w.size // (shape[1] * shape[2] * shape[3])


def compiled_step_hlo(config) -> str:
  """The compiled train step's HLO text on the config's mesh (abstract state)."""
  mesh = partitioning.make_mesh(config.mesh)
  layout = state_lib.state_layout(config, mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=partitioning.batch_sharding(mesh))
           for k, v in random_batch(config.batch_size, config.seq_len).items()}
  step = functools.partial(step_lib.train_step, graphdef=layout.graphdef, tx=layout.tx,
                           num_modalities=2)
  with jax.set_mesh(mesh):
    return jax.jit(step).lower(layout.abstract, batch).compile().as_text()


def test_expert_parallel_step_uses_all_to_all():
  config = moe_tiny(**{'mesh.data': 2, 'mesh.expert': 4})
  hlo = compiled_step_hlo(config)
  assert 'all-to-all' in hlo


def _sort_sizes(hlo: str) -> set[int]:
  """Lengths of the 1-D sorts in a compiled program (the dropless path's argsort)."""
  return {int(n) for n in re.findall(r'= \(s32\[(\d+)\][^=]*? sort\(', hlo)}


@pytest.mark.parametrize('shape', [(1, 8, 1, 1), (2, 2, 1, 2)],
                         ids=lambda s: 'x'.join(map(str, s)))
def test_dropless_without_expert_parallelism_sorts_each_device_groups(shape, reference):
  """Data / FSDP / tensor meshes with expert = 1: the same loss and gradients as one device,
  and each device sorts only its own pairs (moe/parallel.py batch_parallel_dropless), not the
  global batch's (which plain jit does after an all-gather)."""
  config = moe_tiny(**{f'mesh.{a}': s for a, s in zip(partitioning.MESH_AXES, shape)})
  loss, grads, _ = loss_and_grads(config, jax.devices())
  np.testing.assert_allclose(loss, reference[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               grads, reference[1])
  hlo = compiled_step_hlo(config)
  pairs = config.batch_size * config.seq_len * config.model.moe.k  # of the global batch
  local = pairs // (shape[0] * shape[1])
  assert _sort_sizes(hlo) == {local}, (_sort_sizes(hlo), local, pairs)


@pytest.mark.parametrize('router', ['expert_choice', 'batch_prioritized', 'topk_sigmoid'])
def test_capacity_routers_expert_parallel_equal_single_device(router):
  over = {'model.moe.router': router, 'model.moe.dispatch': 'capacity'}
  if router == 'expert_choice':
    over['model.moe.load_balance_coef'] = 0.0
  ref_loss, ref_grads, _ = loss_and_grads(moe_tiny(**over, **{'mesh.data': 1}),
                                          jax.devices()[:1])
  loss, grads, _ = loss_and_grads(moe_tiny(**over, **{'mesh.data': 2, 'mesh.expert': 4}),
                                  jax.devices())
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               grads, ref_grads)


BAD = [
    ({'model.moe.num_experts': 6, 'mesh.data': 2, 'mesh.expert': 4},
     'num_experts=6 is not divisible by mesh.expert=4'),
    ({'model.moe.k': 9}, 'k'),
    ({'model.moe.dispatch': 'capacity', 'model.moe.capacity_factor': 0.0}, 'capacity_factor'),
    ({'model.moe.router': 'nope'}, 'nope'),
    ({'model.moe.dispatch': 'sparse'}, "dispatch='sparse'"),
    ({'model.moe.router': 'expert_choice'}, 'expert-choice routing has a capacity'),
    ({'model.moe.group_size': 7}, 'group_size=7'),
]


@pytest.mark.parametrize('overrides,message', BAD, ids=[str(o) for o, _ in BAD])
def test_bad_moe_config_gives_one_clear_error(overrides, message):
  with pytest.raises(ValueError) as err:
    validate(moe_tiny(**overrides), 8)
  assert message in str(err.value), str(err.value)


def _layer(**spec_overrides):
  spec = moe_layer.MoESpec(num_experts=4, mlp_dim=16,
                           router=routing.RouterConfig(k=2, capacity_factor=None),
                           **spec_overrides)
  return moe_layer.MoELayer(spec, embed_dim=8, dtype=jnp.float32, param_dtype=jnp.float32,
                            rngs=nnx.Rngs(0))


def test_shared_experts_add_a_dense_swiglu_to_the_routed_output():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 8)), jnp.float32)
  with_shared = _layer(num_shared_experts=2)
  routed_only = _layer()
  y, _ = with_shared(x)
  y_routed, _ = routed_only(x)  # same rngs order: router + experts initialised identically
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_routed + with_shared.shared(x)),
                             rtol=1e-5, atol=1e-6)
  assert with_shared.shared.w_up[...].shape == (8, 32)  # 2 shared experts of width 16


def test_residual_moe_mixes_moe_and_mlp_with_learned_softmax():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 8)), jnp.float32)
  layer = _layer(residual=True)
  y, _ = layer(x)
  y_moe, _ = _layer()(x)
  # Zero-initialised mixing weights: [a0, a1] = softmax(0, 0) = [0.5, 0.5].
  np.testing.assert_allclose(np.asarray(y), np.asarray(0.5 * y_moe + 0.5 * layer.residual_mlp(x)),
                             rtol=1e-5, atol=1e-6)


def test_router_jitter_only_with_an_rng():
  spec = moe_layer.MoESpec(num_experts=4, mlp_dim=16, router=routing.RouterConfig(
      k=1, capacity_factor=None, jitter=0.5))
  layer = moe_layer.MoELayer(spec, embed_dim=8, dtype=jnp.float32, param_dtype=jnp.float32,
                             rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 16, 8)), jnp.float32)
  a, _ = layer(x)
  b, _ = layer(x)
  c, _ = layer(x, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # eval: deterministic
  assert not np.allclose(np.asarray(a), np.asarray(c))  # train: jittered routing
