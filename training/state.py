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

from core import partitioning
from models import transformer
from training import stages


@dataclasses.dataclass(frozen=True)
class ModelKind:
  """How a trainer builds its model: config -> spec, and spec -> nnx module."""
  spec: Callable[[Any], Any]
  build: Callable[..., nnx.Module]  # (spec, *, rngs) -> module


def _decoder_spec(config):
  return transformer.spec_from_config(config.model, param_dtype=config.param_dtype,
                                      compute_dtype=config.compute_dtype,
                                      stage=stages.stage_of(config).name)


DECODER = ModelKind(spec=_decoder_spec, build=transformer.Decoder)
# Models that are not a decoder family (models/families.py) register here by family name
# when their package is imported (imp/model.py: 'imp').
OTHER_MODELS: dict[str, ModelKind] = {}


def register_model(family: str, kind: ModelKind) -> None:
  OTHER_MODELS[family] = kind


def model_kind(config) -> ModelKind:
  return OTHER_MODELS.get(config.model.family, DECODER)


def model_spec(config):
  """The model's spec: a DecoderSpec, or what a registered model kind builds (IMP)."""
  return model_kind(config).spec(config)


def make_model(config, seed: int) -> nnx.Module:
  return model_kind(config).build(model_spec(config), rngs=nnx.Rngs(params=seed))


def lr_schedule(config) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to learning_rate * end_lr_factor."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=config.total_steps, end_value=config.learning_rate * config.end_lr_factor)


def param_path(path) -> str:
  """A parameter's tree path as 'blocks/0/ffn/w_up' (what stage regexes match)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
                  for k in path)


def frozen_mask(params, stage: str = 'main'):
  """True for parameters the stage does not train (training/stages.py: stage 'main' trains
  everything but the auxiliary routers; stage 'aux' only them)."""
  trains = stages.STAGES[stage].trains
  return jax.tree_util.tree_map_with_path(lambda path, _: not trains(param_path(path)),
                                          params)


# Without weight decay though 2-D: Mamba's state matrix (SPEC §5) and dt bias (untied: [M, E]).
# Parameters without weight decay whatever their rank: Mamba's state matrix and dt bias, and
# every norm's `scale` (a modality-untied norm's scale is [M, D], a matrix by rank only).
NO_DECAY = ('A_log', 'dt_b', 'scale')


def decay_mask(params):
  """True for the parameters with weight decay: matrices, but not NO_DECAY."""
  def decays(path, p):
    names = param_path(path).split('/')
    return p.ndim >= 2 and not set(names[-2:]) & set(NO_DECAY)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; weight decay on matrices only (not norms, biases,
  NO_DECAY). Frozen parameters (`frozen_mask`) get exactly zero updates (no decay drift)."""
  stage = stages.stage_of(config).name
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
  param_sh = partitioning.tree_shardings(abs_params, mesh)
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
