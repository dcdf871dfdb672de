"""The train state and its birth: abstract init -> shardings -> jitted, sharded init.

The train state is a plain dict pytree `{'step', 'params', 'opt_state'}`: `params` is the
model's `nnx.State` (Variables carry their logical axis names), `opt_state` is optax's.
Nothing here materialises a parameter on one device: shapes come from `nnx.eval_shape`,
shardings from the rules table, and the init runs under `jax.jit(out_shardings=...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from models import imp, transformer
from training import sharding

MODEL_FAMILIES: dict[str, Callable[..., nnx.Module]] = {
    'dense': transformer.Decoder,
    'moe': transformer.Decoder,  # the same decoder with MoE FFNs (config.model.moe)
    'moma': transformer.Decoder,  # with MoMa blocks (config.model.moma)
    'mot': transformer.Decoder,  # with Mixture-of-Transformers blocks (config.model.mot)
    'imp': imp.IMPModel,  # shared encoder + embedders + task heads (training/imp_loop.py)
}


def model_spec(config):
  """The model's spec: a DecoderSpec, or an IMPSpec for family 'imp'."""
  if config.model.family == 'imp':
    return imp.spec_from_config(config.model, param_dtype=config.param_dtype,
                                compute_dtype=config.compute_dtype)
  return transformer.spec_from_config(config.model, param_dtype=config.param_dtype,
                                      compute_dtype=config.compute_dtype,
                                      stage=config.get('stage', 'main'))


def make_model(config, seed: int) -> nnx.Module:
  family = MODEL_FAMILIES[config.model.family]
  return family(model_spec(config), rngs=nnx.Rngs(params=seed))


def lr_schedule(config) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to learning_rate * end_lr_factor."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=config.total_steps, end_value=config.learning_rate * config.end_lr_factor)


AUX_ROUTER_KEYS = ('aux_router', 'aux_routers')  # MoMa / MoD causal-inference routers


def is_aux_router(path) -> bool:
  return any(getattr(k, 'key', None) in AUX_ROUTER_KEYS for k in path)


def frozen_mask(params, stage: str = 'main'):
  """True for parameters the stage does not train: stage 'main' trains everything but the
  auxiliary routers; stage 'aux' trains only them (the main model is frozen)."""
  aux_stage = stage == 'aux'
  return jax.tree_util.tree_map_with_path(
      lambda path, _: is_aux_router(path) != aux_stage, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; weight decay on matrices only (not norms/biases).
  Frozen parameters (`frozen_mask`) get exactly zero updates (no decay drift either)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  stage = config.get('stage', 'main')
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip),
      optax.adamw(lr_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                  eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask),
      optax.masked(optax.set_to_zero(), lambda params: frozen_mask(params, stage)))


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Everything needed to build, restore or run a train state on a mesh."""
  graphdef: Any  # nnx GraphDef of the model
  abstract: Any  # train state of jax.ShapeDtypeStruct (with .sharding)
  shardings: Any  # train state of NamedSharding
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh


def state_layout(config, mesh: jax.sharding.Mesh) -> StateLayout:
  """Abstract train state and its shardings on `mesh`, without allocating anything."""
  tx = make_optimizer(config)
  abs_model = nnx.eval_shape(lambda: make_model(config, config.seed))
  graphdef, abs_params = nnx.split(abs_model)
  param_sh = sharding.tree_shardings(abs_params, mesh)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  replicated = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, param_sh,
                                 transform_non_params=lambda _: replicated)
  shardings = {'step': replicated, 'params': param_sh, 'opt_state': opt_sh}
  abstract_tree = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': abs_params,
                   'opt_state': abs_opt}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_tree, shardings)
  return StateLayout(graphdef, abstract, shardings, tx, mesh)


def init_state(config, layout: StateLayout):
  """Initialise the train state directly into its shardings."""

  def init():
    params = nnx.split(make_model(config, config.seed))[1]
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': layout.tx.init(params)}

  with jax.set_mesh(layout.mesh):
    return jax.jit(init, out_shardings=layout.shardings)()


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
