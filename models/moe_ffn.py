"""The MoE family: the dense family's blocks with a mixture-of-experts FFN (moe/layer.py)
every `model.moe.every` layers (configs/moe.py): routers, capacity or dropless dispatch,
expert parallelism over the mesh axis 'expert'."""

from __future__ import annotations

from core import layers
from models import dense, family as family_lib
from moe import layer as moe_layer
from moe import routing


def moe_spec_from_config(moe_cfg, grouped_impl: str = 'auto') -> moe_layer.MoESpec:
  """A `model.moe`-like config block -> MoESpec (also MoT's MoE modality); `grouped_impl`:
  config.model.grouped_impl."""
  dropless = moe_cfg.dispatch == 'dropless'
  router = routing.RouterConfig(
      name=moe_cfg.router, k=moe_cfg.k,
      capacity_factor=None if dropless else moe_cfg.capacity_factor,
      renormalize=moe_cfg.renormalize, jitter=moe_cfg.jitter,
      load_balance_coef=moe_cfg.load_balance_coef, z_loss_coef=moe_cfg.z_loss_coef)
  return moe_layer.MoESpec(
      num_experts=moe_cfg.num_experts, mlp_dim=moe_cfg.mlp_dim, router=router,
      dispatch=moe_cfg.dispatch, group_size=moe_cfg.group_size,
      num_shared_experts=moe_cfg.num_shared_experts, residual=moe_cfg.residual,
      grouped_impl=grouped_impl)


def is_moe_layer(spec, layer: int) -> bool:
  """Layer i has a MoE FFN iff i % every == every - 1."""
  return layer % spec.moe_every == spec.moe_every - 1


def block(spec, layer: int, rngs):
  if not is_moe_layer(spec, layer):
    return dense.Block(spec, rngs=rngs)
  dtype, pdtype = layers.dtype_of(spec.dtype), layers.dtype_of(spec.param_dtype)
  return dense.Block(spec, ffn=moe_layer.MoELayer(
      spec.moe, embed_dim=spec.embed_dim, dtype=dtype, param_dtype=pdtype, rngs=rngs),
      rngs=rngs)


def moe_params(moe: moe_layer.MoESpec, embed_dim: int, active: bool) -> int:
  """One MoE FFN: its experts (active: the k a token visits, or c under expert choice), the
  router, shared experts and the PR-MoE residual MLP and mix."""
  d = embed_dim
  expert = 3 * d * moe.mlp_dim
  if active:
    routed = (moe.router.capacity_factor if moe.router.expert_choice else moe.router.k) * expert
  else:
    routed = moe.num_experts * expert
  extra = moe.num_shared_experts * expert + (expert + 2 * d if moe.residual else 0)
  return int(routed) + d * moe.num_experts + extra


def layer_params(spec, layer: int, active: bool) -> int:
  if not is_moe_layer(spec, layer):
    return dense.layer_params(spec, layer, active)
  return family_lib.attention_and_norm_params(spec) + moe_params(spec.moe, spec.embed_dim,
                                                                  active)


def check_moe_block(moe, prefix: str) -> None:
  """Integer fields of a `model.moe`-like block (also MoT's `model.mot.moe`)."""
  for key in ('num_experts', 'k', 'mlp_dim'):
    if not isinstance(moe[key], int) or moe[key] <= 0:
      raise ValueError(f'config.{prefix}.{key} must be a positive integer, got {moe[key]!r}')


def validate(config, sizes) -> None:
  moe = config.model.moe
  check_moe_block(moe, 'model.moe')
  if not isinstance(moe.every, int) or moe.every <= 0:
    raise ValueError(f'config.model.moe.every must be a positive integer, got {moe.every!r}')
  if moe.dispatch == 'capacity' and not moe.capacity_factor > 0:
    raise ValueError(f'config.model.moe.capacity_factor must be > 0, got '
                     f'{moe.capacity_factor!r}')
  if moe.mlp_dim % sizes['tensor']:
    raise ValueError(f"config.model.moe.mlp_dim={moe.mlp_dim} is not divisible by "
                     f"mesh.tensor={sizes['tensor']}")
  spec = moe_spec_from_config(moe)
  moe_layer.check_moe_spec(spec, seq_len=config.seq_len, expert_shards=sizes['expert'])
  group = moe.group_size or config.seq_len
  groups = config.batch_size * config.seq_len // group
  shards = sizes['data'] * sizes['fsdp'] * sizes['expert']
  if groups % shards:
    raise ValueError(f'{groups} routing groups of model.moe.group_size={group} tokens do not '
                     f'split over the {shards} batch shards')


def decode_unsupported_moe(moe: moe_layer.MoESpec, key: str) -> str | None:
  """Expert choice looks at the whole routing group, future tokens included, and the MoE
  family has no causal router for it (MoMa's aux routers are one)."""
  if moe.router.expert_choice:
    return (f'config.{key}.router={moe.router.name!r} routes by expert choice, which sees '
            'future tokens, and this family has no causal router: it cannot generate')
  return None


FAMILY = family_lib.Family(
    name='moe',
    spec_fields=lambda model_cfg, stage: {'moe': moe_spec_from_config(model_cfg.moe,
                                                                        model_cfg.grouped_impl),
                                          'moe_every': model_cfg.moe.every},
    block=block,
    layer_params=layer_params,
    validate=validate,
    decode_unsupported=lambda spec: decode_unsupported_moe(spec.moe, 'model.moe'),
)
