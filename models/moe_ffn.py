"""The MoE family: the dense family's blocks with a mixture-of-experts FFN (moe/layer.py)
every `model.moe.every` layers (configs/moe.py): routers, capacity or dropless dispatch,
expert parallelism over the mesh axis 'expert'.

PR-MoE (DeepSpeed-MoE, arXiv 2201.05596; docs/pyramid_upcycle.md): the residual form
(`model.moe.residual`, moe/layer.py) and the pyramid, one expert count per MoE layer
(`model.moe.num_experts_per_layer`, e.g. '32x10,64x2'). A pyramid's counts live in the
spec's `ext` (`MoELayers`); `layer_moe(spec, layer)` is the MoESpec of one layer, and
everything per layer (blocks, parameter and FLOP counts, checks) goes through it. A uniform
config has `ext=None` and builds exactly the model it always did.

Fine-grained experts (`model.moe.slices` = g > 0; models/upcycle.py cuts a dense FFN into
them): each expert is 1/g of the dense FFN width, expert e a clone of slice e % g, the
routed output scaled by g, and the layer logs how often clones fire together.
"""

from __future__ import annotations

import dataclasses

from configs import moe as moe_configs
from core import layers
from models import dense, family as family_lib
from moe import layer as moe_layer
from moe import routing

PER_LAYER_KEY = moe_configs.PER_LAYER_KEY
SPAWNS = ('copy', 'noise')  # model.moe.spawn: how upcycling makes experts (models/upcycle.py)


@dataclasses.dataclass(frozen=True)
class MoELayers:
  """The MoE family's `DecoderSpec.ext` under a PR-MoE pyramid (None without one)."""
  num_experts: tuple[int, ...]  # E of each MoE layer, in layer order


def moe_spec_from_config(moe_cfg, grouped_impl: str = 'auto') -> moe_layer.MoESpec:
  """A `model.moe`-like config block -> MoESpec (also MoT's MoE modality); `grouped_impl`:
  config.model.grouped_impl. Keys a block may lack (MoT's): `slices` (0)."""
  dropless = moe_cfg.dispatch == 'dropless'
  defaults = routing.RouterConfig()
  gate = {key: moe_cfg.get(key, getattr(defaults, key)) for key in routing.GATE_FIELDS}
  router = routing.RouterConfig(
      name=moe_cfg.router, k=moe_cfg.k,
      capacity_factor=None if dropless else moe_cfg.capacity_factor,
      renormalize=moe_cfg.renormalize, jitter=moe_cfg.jitter,
      load_balance_coef=moe_cfg.load_balance_coef, z_loss_coef=moe_cfg.z_loss_coef, **gate)
  slices = moe_cfg.get('slices', 0)
  return moe_layer.MoESpec(
      num_experts=moe_cfg.num_experts, mlp_dim=moe_cfg.mlp_dim, router=router,
      dispatch=moe_cfg.dispatch, group_size=moe_cfg.group_size,
      num_shared_experts=moe_cfg.num_shared_experts, residual=moe_cfg.residual,
      grouped_impl=grouped_impl, routed_scale=float(slices or 1), clone_groups=slices,
      spawn_noise=moe_cfg.spawn_noise if moe_cfg.get('spawn', 'copy') == 'noise' else 0.0)


def num_moe_layers(num_layers: int, every: int) -> int:
  return num_layers // every


def experts_per_layer(moe_cfg, num_layers: int) -> tuple[int, ...] | None:
  """The pyramid's E of each MoE layer (`model.moe.num_experts_per_layer`), None when the
  key is ''; ValueError naming the key when its counts do not match the MoE layers."""
  text = moe_cfg.get('num_experts_per_layer', '')
  if not text:
    return None
  counts = moe_configs.parse_expert_counts(text)
  n = num_moe_layers(num_layers, moe_cfg.every)
  if len(counts) != n:
    raise ValueError(f'{PER_LAYER_KEY}={text!r} gives {len(counts)} expert counts but the '
                     f'model has {n} MoE layers (model.num_layers={num_layers}, '
                     f'model.moe.every={moe_cfg.every})')
  return counts


def spec_fields(model_cfg, stage: str) -> dict:
  del stage
  fields = {'moe': moe_spec_from_config(model_cfg.moe, model_cfg.grouped_impl),
            'moe_every': model_cfg.moe.every}
  counts = experts_per_layer(model_cfg.moe, model_cfg.num_layers)
  if counts is not None:
    fields['ext'] = MoELayers(num_experts=counts)
  return fields


def is_moe_layer(spec, layer: int) -> bool:
  """Layer i has a MoE FFN iff i % every == every - 1."""
  return layer % spec.moe_every == spec.moe_every - 1


def layer_moe(spec, layer: int) -> moe_layer.MoESpec | None:
  """The MoESpec of layer `layer` (its own expert count under a pyramid); None for a dense
  layer."""
  if not is_moe_layer(spec, layer):
    return None
  if spec.ext is None:
    return spec.moe
  return dataclasses.replace(spec.moe, num_experts=spec.ext.num_experts[layer // spec.moe_every])


def block(spec, layer: int, rngs):
  moe = layer_moe(spec, layer)
  if moe is None:
    return dense.Block(spec, rngs=rngs)
  dtype, pdtype = layers.dtype_of(spec.dtype), layers.dtype_of(spec.param_dtype)
  return dense.Block(spec, ffn=moe_layer.MoELayer(
      moe, embed_dim=spec.embed_dim, dtype=dtype, param_dtype=pdtype, rngs=rngs),
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
  moe = layer_moe(spec, layer)
  if moe is None:
    return dense.layer_params(spec, layer, active)
  return family_lib.attention_and_norm_params(spec) + moe_params(moe, spec.embed_dim, active)


def layer_summary(spec, layer: int) -> str:
  """The run log's per-layer table (training/flops.py): what the layer's FFN is."""
  moe = layer_moe(spec, layer)
  if moe is None:
    return f'dense F={spec.mlp_dim}'
  r = moe.router
  routed = f'c={r.capacity_factor:g}' if r.expert_choice else f'k={r.k}'
  if r.gated:
    routed += f' {r.name} (up to k)'
  extra = (f' +{moe.num_shared_experts} shared' if moe.num_shared_experts else '') + (
      ' +residual MLP' if moe.residual else '') + (
      f' ({moe.clone_groups} slices)' if moe.clone_groups else '')
  return f'moe E={moe.num_experts} {routed} F={moe.mlp_dim}{extra}'


def check_moe_block(moe, prefix: str) -> None:
  """Integer fields of a `model.moe`-like block (also MoT's `model.mot.moe`)."""
  for key in ('num_experts', 'k', 'mlp_dim'):
    if not isinstance(moe[key], int) or moe[key] <= 0:
      raise ValueError(f'config.{prefix}.{key} must be a positive integer, got {moe[key]!r}')


def upcycle_problems(moe: moe_layer.MoESpec) -> list[str]:
  """What keeps a MoE model (its `DecoderSpec.moe`) from starting as exactly a dense
  model's function once models/upcycle.py has cut the dense FFN into its experts (see
  there), naming config keys; [] = nothing. Every layer's E being a multiple of g is
  `check_moe_spec`'s."""
  g = moe.clone_groups
  if g < 1:
    return ['upcycling into a MoE model needs model.moe.slices >= 1 (configs/moe.py '
            'slices=g: the dense FFN cut into g slices; 1 = a copy of it in every expert)']
  r = moe.router
  problems = []
  if r.gated:  # EvoMoE's spawning: clones (+ noise) under the gate; not the dense function
    if moe.dispatch != 'dropless':
      problems.append(f"model.moe.dispatch={moe.dispatch!r}: spawning experts needs "
                      "'dropless'")
    return problems
  if r.expert_choice:
    problems.append(f'model.moe.router={r.name!r} routes by expert choice: upcycling needs '
                    'token choice (every token must reach one clone of every slice)')
  if moe.dispatch != 'dropless':
    problems.append(f"model.moe.dispatch={moe.dispatch!r} would drop tokens: upcycling needs "
                    "'dropless'")
  if not r.expert_choice and not r.renormalize:
    problems.append('model.moe.renormalize must be True to upcycle (the k weights then '
                    'add to 1)')
  if not r.expert_choice and r.k % g:
    problems.append(f'model.moe.k={r.k} must be a multiple of model.moe.slices={g} (top-k '
                    'then takes every slice k/g times)')
  if moe.num_shared_experts:
    problems.append(f'model.moe.num_shared_experts={moe.num_shared_experts}: a fresh shared '
                    'expert would change the function; upcycle with 0')
  return problems


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
  spawn = moe.get('spawn', 'copy')
  if spawn not in SPAWNS:
    raise ValueError(f'config.model.moe.spawn={spawn!r} is not one of {SPAWNS}')
  if spawn == 'noise' and not (moe.spawn_noise > 0 and config.get('upcycle_from')):
    raise ValueError('config.model.moe.spawn=noise needs model.moe.spawn_noise > 0 (got '
                     f'{moe.spawn_noise!r}) and a dense run to spawn from (upcycle_from)')
  g = moe.get('slices', 0)
  if not isinstance(g, int) or isinstance(g, bool) or g < 0:
    raise ValueError(f'config.model.moe.slices must be an integer >= 0, got {g!r}')
  width = config.model.mlp_dim
  if g and width % g:
    raise ValueError(f'config.model.moe.slices={g} does not divide the dense FFN width '
                     f'model.mlp_dim={width}')
  if g and moe.mlp_dim * g != width:
    raise ValueError(f'config.model.moe.mlp_dim={moe.mlp_dim} must be model.mlp_dim / '
                     f'model.moe.slices = {width} / {g} = {width // g} (each expert is one '
                     f'slice of the dense FFN)')
  counts = experts_per_layer(moe, config.model.num_layers)
  if counts is not None:
    for what, bad in (
        (f"mesh.expert={sizes['expert']}", [e for e in counts if e % sizes['expert']]),
        (f'model.moe.slices={g} (each slice has E/g clones)',
         [e for e in counts if g and e % g])):
      if bad:
        raise ValueError(f'{PER_LAYER_KEY}={moe.num_experts_per_layer!r}: expert counts '
                         f'{sorted(set(bad))} are not multiples of {what}')
    if moe.router not in routing.EXPERT_CHOICE and moe.k > min(counts):
      raise ValueError(f'config.model.moe.k={moe.k} is more than the {min(counts)} experts of '
                       f'a MoE layer ({PER_LAYER_KEY}={moe.num_experts_per_layer!r})')
  spec = moe_spec_from_config(moe)
  for e in sorted(set(counts or (moe.num_experts,))):
    moe_layer.check_moe_spec(dataclasses.replace(spec, num_experts=e), seq_len=config.seq_len,
                             expert_shards=sizes['expert'])
  if config.get('upcycle_from'):
    problems = upcycle_problems(spec)
    if problems:
      raise ValueError(f'config.upcycle_from={config.upcycle_from!r}: ' + '; '.join(problems))
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
    spec_fields=spec_fields,
    block=block,
    layer_params=layer_params,
    validate=validate,
    decode_unsupported=lambda spec: decode_unsupported_moe(spec.moe, 'model.moe'),
    layer_summary=layer_summary,
)
